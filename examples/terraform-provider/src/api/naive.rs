//! The cloud the usual way: reqwest-retry's `RetryTransientMiddleware` with its documented
//! default policy on every request (POSTs included), no keys, no journal; the id is known only
//! when the create returns, after the wait. What most providers do today, for comparison.

// Written the usual way, on the real clock (see the repository's `clippy.toml`).
#![allow(clippy::disallowed_methods)]

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue};
use reqwest_middleware::ClientWithMiddleware;
use reqwest_retry::RetryTransientMiddleware;
use reqwest_retry::policies::ExponentialBackoff;
use serde_json::{Value, json};

use super::{CreateFailure, Cvm, READY_TIMEOUT, Settings, listed_ids, replicas_path};

pub struct Api {
    endpoint: String,
    client: ClientWithMiddleware,
}

impl Api {
    pub async fn new(settings: &Settings) -> Result<Self> {
        let mut headers = HeaderMap::new();
        if let Some(token) = &settings.token {
            headers.insert(AUTHORIZATION, HeaderValue::from_str(&format!("Bearer {token}")).context("the token")?);
        }
        let http = reqwest::Client::builder().default_headers(headers).timeout(Duration::from_secs(30)).build()?;
        let retry = RetryTransientMiddleware::new_with_policy(ExponentialBackoff::builder().build_with_max_retries(3));
        let client = reqwest_middleware::ClientBuilder::new(http).with(retry).build();
        Ok(Self { endpoint: settings.endpoint.trim_end_matches('/').to_owned(), client })
    }

    pub async fn create_cvm(&self, name: &str, image: &str, app_id: &str) -> Result<Cvm, CreateFailure> {
        let fail = |message: String| CreateFailure { created: None, message };
        let body = json!({"name": name, "image": image, "app_id": app_id});
        let response = self.client.post(format!("{}/cvms", self.endpoint)).json(&body).send().await;
        let resource: Value = match response.map(reqwest::Response::error_for_status) {
            Ok(Ok(response)) => response.json().await.map_err(|e| fail(e.to_string()))?,
            Ok(Err(e)) => return Err(fail(e.to_string())),
            Err(e) => return Err(fail(e.to_string())),
        };
        let created = Cvm::from_json(&resource).ok_or_else(|| fail(format!("unexpected answer {resource}")))?;
        // Wait until it runs; the id reaches Terraform only when this returns.
        let started = Instant::now();
        loop {
            match self.read_cvm(&created.id).await {
                Ok(Some(cvm)) if cvm.status == "running" => return Ok(cvm),
                Ok(Some(cvm)) if cvm.status == "error" => {
                    return Err(CreateFailure { created: Some(cvm), message: "it failed".into() });
                }
                _ if started.elapsed() > READY_TIMEOUT => {
                    return Err(CreateFailure { created: Some(created), message: "not running in time".into() });
                }
                _ => tokio::time::sleep(Duration::from_secs(1)).await,
            }
        }
    }

    pub async fn read_cvm(&self, id: &str) -> Result<Option<Cvm>> {
        let response = self.client.get(format!("{}/cvms/{id}", self.endpoint)).send().await?;
        if response.status() == 404 {
            return Ok(None);
        }
        let resource: Value = response.error_for_status()?.json().await?;
        Ok(Cvm::from_json(&resource))
    }

    pub async fn delete_cvm(&self, cvm: &Cvm) -> Result<()> {
        let response = self.client.delete(format!("{}/cvms/{}", self.endpoint, cvm.id)).send().await?;
        if response.status() != 404 {
            response.error_for_status()?;
        }
        Ok(())
    }

    /// Lists, then creates what is missing and deletes the newest of what is over.
    pub async fn ensure_replicas(&self, app_id: &str, vm_uuid: &str, count: usize, prune: bool) -> Result<Vec<String>> {
        let url = format!("{}{}", self.endpoint, replicas_path(app_id, vm_uuid));
        let ids = self.read_replicas(app_id, vm_uuid).await?;
        for _ in ids.len()..count {
            self.client.post(&url).json(&json!({})).send().await?.error_for_status()?;
        }
        if prune && ids.len() > count {
            for id in &ids[count..] {
                let response = self.client.delete(format!("{url}/{id}")).send().await?;
                if response.status() != 404 {
                    response.error_for_status()?;
                }
            }
        }
        self.read_replicas(app_id, vm_uuid).await
    }

    pub async fn read_replicas(&self, app_id: &str, vm_uuid: &str) -> Result<Vec<String>> {
        let url = format!("{}{}", self.endpoint, replicas_path(app_id, vm_uuid));
        let list: Value = self.client.get(url).send().await?.error_for_status()?.json().await?;
        Ok(listed_ids(&list))
    }

    pub async fn delete_replicas(&self, app_id: &str, vm_uuid: &str) -> Result<()> {
        self.ensure_replicas(app_id, vm_uuid, 0, true).await.map(|_| ())
    }
}
