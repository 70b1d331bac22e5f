//! The cloud through idempotent-retry: keyed creates journaled before they are sent, waits whose
//! handle is journaled before they begin, reconciles without overshoot.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use idempotent_retry::journal::store::Finish;
use idempotent_retry::journal::{KeyStore, OpState, PostgresJournal, Record, SqliteJournal};
use idempotent_retry::operation::{OperationError, ReadBack};
use idempotent_retry::reconcile::{Desired, Prune};
use idempotent_retry::time::{Clock, SystemClock};
use idempotent_retry::wait::{WaitError, WaitFor};
use idempotent_retry::{IdempotentRetry, Operations, Reconciler, RetryPolicy};
use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::{CreateFailure, Cvm, READY_TIMEOUT, Settings, listed_ids, replicas_path};

/// The cloud, through the retry layer, the journal and the reconciler.
pub struct Api {
    endpoint: String,
    ops: Operations,
    store: Arc<dyn KeyStore>,
}

impl Api {
    pub async fn new(settings: &Settings) -> Result<Self> {
        let mut headers = HeaderMap::new();
        if let Some(token) = &settings.token {
            let mut value = HeaderValue::from_str(&format!("Bearer {token}")).context("the token")?;
            value.set_sensitive(true);
            headers.insert(AUTHORIZATION, value);
        }
        // A write's redirect is its answer: the layer follows it within its origin, or stops.
        let http =
            reqwest::Client::builder().default_headers(headers).redirect(reqwest::redirect::Policy::none()).build()?;
        // Patient: an apply is worth more than a few extra requests, and the deadline bounds it.
        let policy = RetryPolicy::standard().with_max_attempts(10).with_deadline(Duration::from_secs(120));
        let mut layer = IdempotentRetry::builder().policy(policy);
        if settings.adaptive_rate {
            layer = layer.adaptive();
        }
        let layer = layer.build();
        let store: Arc<dyn KeyStore> = match settings.journal.as_deref() {
            // Shared by every agent that applies for this account: its records scoped to it.
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                Arc::new(PostgresJournal::builder(url).scope(scope(settings)).open().await?)
            }
            Some(path) => Arc::new(SqliteJournal::open(path)?),
            None => {
                let path = SqliteJournal::default_path().context("no home directory for the journal; set `journal`")?;
                Arc::new(SqliteJournal::open(&path)?)
            }
        };
        let client = reqwest_middleware::ClientBuilder::new(http).with(layer).build();
        let ops = Operations::with_store(client, store.clone()).scope(scope(settings));
        Ok(Self { endpoint: settings.endpoint.trim_end_matches('/').to_owned(), ops, store })
    }

    /// Creates a CVM and waits until it runs. Its key derives from the provider's scope, the
    /// CVM's identity (`app_id`, `name`) and a generation the journal keeps: stable across a
    /// killed apply and a re-plan (none of them comes from the plan), new after a destroy.
    pub async fn create_cvm(&self, name: &str, image: &str, app_id: &str) -> Result<Cvm, CreateFailure> {
        let fail = |message: String| CreateFailure { created: None, message };
        let prefix = format!("fakecloud_cvm/{app_id}/{name}");
        let generation = self.generation(&prefix).await.map_err(|e| fail(e.to_string()))?;
        let url = format!("{}/cvms", self.endpoint);
        let started = self
            .ops
            .operation(format!("{prefix}/g{generation}"))
            .post(&url)
            .json(&json!({"name": name, "image": image, "app_id": app_id}))
            .derived_key(generation)
            .expect("name", name)
            .expect("app_id", app_id)
            .read_back(ReadBack::find_in_list(&url, "name", name))
            .wait(ready())
            .start()
            .await
            .map_err(|e| fail(create_error(&e)))?;
        // The id is journaled now, with where to wait: a kill from here on is resumed.
        let created = Cvm::from_json(&started.created().resource);
        match started.wait().await {
            Ok(done) => {
                Cvm::from_json(&done.resource).ok_or_else(|| fail(format!("unexpected answer {}", done.resource)))
            }
            Err(OperationError::Wait(failed)) => {
                let last = match &failed.source {
                    WaitError::Failed { resource, .. } | WaitError::UnexpectedState { resource, .. } => {
                        Cvm::from_json(resource)
                    }
                    WaitError::TimedOut { resource: Some(resource), .. } => Cvm::from_json(resource),
                    _ => None,
                };
                Err(CreateFailure { created: last.or(created), message: failed.to_string() })
            }
            Err(e) => Err(CreateFailure { created, message: create_error(&e) }),
        }
    }

    /// The CVM, or `None` when it is gone.
    pub async fn read_cvm(&self, id: &str) -> Result<Option<Cvm>> {
        let response = self.ops.client().get(self.item("cvms", id)?).send().await?;
        if response.status() == 404 {
            return Ok(None);
        }
        let resource: Value = response.error_for_status()?.json().await?;
        // Not `None`: Terraform would drop a CVM it cannot make sense of from its state.
        Cvm::from_json(&resource).map(Some).with_context(|| format!("an unexpected answer for CVM {id}: {resource}"))
    }

    /// Deletes a CVM (a 404 is gone already), then marks its generation deleted in the journal:
    /// the next create of the same name derives a new key.
    pub async fn delete_cvm(&self, cvm: &Cvm) -> Result<()> {
        let response = self.ops.client().delete(self.item("cvms", &cvm.id)?).send().await?;
        if response.status() != 404 {
            response.error_for_status()?;
        }
        self.mark_deleted(&format!("fakecloud_cvm/{}/{}", cvm.app_id, cvm.name), &cvm.id).await
    }

    /// Marks the generations under `prefix` that created `id` deleted.
    async fn mark_deleted(&self, prefix: &str, id: &str) -> Result<()> {
        for (_, record) in generations(&*self.store, prefix).await? {
            if created_id(&record) == Some(id) {
                let tombstone = Finish::new(record.claim(), OpState::Succeeded, SystemClock.now())
                    .status(record.status)
                    .identity(Some(json!({"id": id, "deleted": true})));
                self.store.finish(&record.operation, &tombstone).await?;
            }
        }
        Ok(())
    }

    /// Makes the CVM hold `count` replicas, each running; surplus this set created is deleted
    /// when `prune`. The live ids after.
    pub async fn ensure_replicas(&self, app_id: &str, vm_uuid: &str, count: usize, prune: bool) -> Result<Vec<String>> {
        let mut reconciler = self.reconciler(app_id, vm_uuid, if prune { Prune::Ours } else { Prune::Never });
        let report = reconciler.reconcile(&Desired::Count(count)).await?;
        if !report.converged {
            anyhow::bail!("{report}: pass prune = true to delete the surplus");
        }
        self.read_replicas(app_id, vm_uuid).await
    }

    /// The live replicas' ids.
    pub async fn read_replicas(&self, app_id: &str, vm_uuid: &str) -> Result<Vec<String>> {
        let url = format!("{}{}", self.endpoint, replicas_path(app_id, vm_uuid));
        let list: Value = self.ops.client().get(url).send().await?.error_for_status()?.json().await?;
        Ok(listed_ids(&list))
    }

    /// Deletes the replicas this set created; never another writer's. Replicas that remain
    /// (another writer's, or ones this set cannot prove it made) fail the destroy, so Terraform
    /// keeps the set in its state instead of forgetting what is still there.
    pub async fn delete_replicas(&self, app_id: &str, vm_uuid: &str) -> Result<()> {
        let mut reconciler = self.reconciler(app_id, vm_uuid, Prune::Ours);
        let report = reconciler.reconcile(&Desired::Count(0)).await?;
        if !report.converged {
            anyhow::bail!(
                "{report}: {} replica(s) remain that this set did not create ({}); delete them, or import them, then destroy again",
                report.overshoot_ids.len(),
                report.overshoot_ids.join(", ")
            );
        }
        Ok(())
    }

    fn reconciler(&self, app_id: &str, vm_uuid: &str, prune: Prune) -> Reconciler {
        let url = format!("{}{}", self.endpoint, replicas_path(app_id, vm_uuid));
        Reconciler::new(self.ops.clone(), url, format!("fakecloud_replica_set/{app_id}/{vm_uuid}"))
            .expect_field("app_id", app_id)
            .expect_field("vm_uuid", vm_uuid)
            .prune(prune)
            .wait_for(ready())
            .deadline(READY_TIMEOUT)
    }

    /// `{endpoint}/{collection}/{id}`, the id as one path segment.
    fn item(&self, collection: &str, id: &str) -> Result<url::Url> {
        let mut url = url::Url::parse(&format!("{}/{collection}", self.endpoint))?;
        url.path_segments_mut().map_err(|()| anyhow::anyhow!("the endpoint cannot have items"))?.push(id);
        Ok(url)
    }

    /// The generation of the next create under `prefix`: the latest, unless its CVM is gone.
    /// Gone is marked deleted (destroyed by this provider), or answered 404 by the server
    /// (deleted outside Terraform, or by a destroy killed before it marked the record): the
    /// latest generation's key would be resent, and the server would replay the create of a
    /// CVM that no longer exists. (This API reads by id consistently, as most do; one whose
    /// reads lag its writes would need several 404s in a row here, like a wait's
    /// `not_found_checks`.) A generation whose create has not answered yet has no id: it is
    /// resumed, never passed over.
    async fn generation(&self, prefix: &str) -> Result<u64> {
        let latest = generations(&*self.store, prefix).await?.into_iter().max_by_key(|(g, _)| *g);
        let Some((generation, record)) = latest else { return Ok(1) };
        if is_deleted(&record) {
            return Ok(generation + 1);
        }
        match created_id(&record) {
            Some(id) if self.read_cvm(id).await?.is_none() => {
                self.mark_deleted(prefix, id).await?;
                Ok(generation + 1)
            }
            _ => Ok(generation),
        }
    }
}

/// Every generation's record under `prefix` (`{prefix}/g{n}`).
async fn generations(store: &dyn KeyStore, prefix: &str) -> Result<Vec<(u64, Record)>> {
    let start = format!("{prefix}/g");
    Ok(store
        .list()
        .await?
        .into_iter()
        .filter_map(|r| r.operation.strip_prefix(&start).and_then(|g| g.parse().ok()).map(|g| (g, r)))
        .collect())
}

/// The id of what a generation's create made, once the server answered it.
fn created_id(record: &Record) -> Option<&str> {
    record.identity.as_ref()?.get("id")?.as_str()
}

fn is_deleted(record: &Record) -> bool {
    record.identity.as_ref().and_then(|i| i.get("deleted")) == Some(&json!(true))
}

/// Ready means running; `error` will never be.
fn ready() -> WaitFor {
    WaitFor::field("status").target(["running"]).failure(["error"]).timeout(READY_TIMEOUT)
}

/// The caller's scope: the endpoint and a hash of the token (never the token itself).
fn scope(settings: &Settings) -> String {
    let mut hash = Sha256::new();
    hash.update(settings.endpoint.as_bytes());
    hash.update(b"\n");
    hash.update(settings.token.as_deref().unwrap_or_default().as_bytes());
    hash.finalize().iter().take(12).map(|b| format!("{b:02x}")).collect()
}

fn create_error(e: &OperationError) -> String {
    let text = idempotent_retry::error::chain(e);
    if e.may_have_been_applied() {
        format!("{text}. It may have been created: apply again, and the journal resumes it instead of creating another")
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wiremock::matchers::{method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    async fn api(server: &MockServer, name: &str) -> Api {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let journal = std::env::temp_dir().join(format!("fakecloud-provider-{name}-{}.sqlite3", std::process::id()));
        let _ = std::fs::remove_file(&journal);
        Api::new(&Settings {
            endpoint: server.uri(),
            token: None,
            journal: Some(journal.display().to_string()),
            adaptive_rate: false,
        })
        .await
        .unwrap()
    }

    /// A read answered with something that is not a CVM is an error: Terraform keeps the CVM
    /// in its state. Only a 404 is gone (Terraform drops it, and plans a create).
    #[tokio::test]
    async fn a_read_it_cannot_parse_is_an_error_and_only_a_404_is_gone() {
        let server = MockServer::start().await;
        let answer = |status: u16, body: Value| ResponseTemplate::new(status).set_body_json(body);
        Mock::given(method("GET"))
            .and(path("/cvms/c1"))
            .respond_with(answer(200, json!({"id": "c1"})))
            .mount(&server)
            .await;
        Mock::given(method("GET")).and(path("/cvms/c2")).respond_with(answer(404, json!({}))).mount(&server).await;
        let cvm = json!({"id": "c3", "name": "web-0", "app_id": "a", "status": "running"});
        Mock::given(method("GET")).and(path("/cvms/c3")).respond_with(answer(200, cvm)).mount(&server).await;
        let api = api(&server, "read").await;

        let err = api.read_cvm("c1").await.unwrap_err();

        assert!(format!("{err:#}").contains("an unexpected answer for CVM c1"), "{err:#}");
        assert_eq!(api.read_cvm("c2").await.unwrap(), None);
        assert_eq!(api.read_cvm("c3").await.unwrap().map(|c| c.id), Some("c3".to_owned()));
    }
}
