//! `fakecloud_replica_set`: a CVM's replicas, kept at a desired number without overshoot.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tf_provider::schema::{AttributeConstraint, AttributeType, Block, Description, Schema};
use tf_provider::value::{Value, ValueBool, ValueEmpty, ValueList, ValueNumber, ValueString};
use tf_provider::{AttributePath, Diagnostics, Resource, map};

use crate::cvm::text;
use crate::provider::{Shared, attribute};

pub struct ReplicaSetResource {
    pub shared: Shared,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct ReplicaSetState<'a> {
    #[serde(borrow = "'a")]
    pub id: ValueString<'a>,
    #[serde(borrow = "'a")]
    pub app_id: ValueString<'a>,
    #[serde(borrow = "'a")]
    pub vm_uuid: ValueString<'a>,
    pub replicas: ValueNumber,
    pub prune: ValueBool,
    #[serde(borrow = "'a")]
    pub ids: ValueList<ValueString<'a>>,
}

impl<'a> ReplicaSetState<'a> {
    fn parent(&self) -> (String, String) {
        let get = |v: &ValueString<'a>| v.as_ref_option().map(|s| s.to_string()).unwrap_or_default();
        (get(&self.app_id), get(&self.vm_uuid))
    }

    fn with_ids(mut self, ids: Vec<String>) -> Self {
        let (app_id, vm_uuid) = self.parent();
        self.id = text(format!("{app_id}/{vm_uuid}"));
        self.replicas = Value::Value(ids.len() as i64);
        self.ids = Value::Value(ids.into_iter().map(text).collect());
        if self.prune.is_null() {
            self.prune = Value::Value(false);
        }
        self
    }

    fn desired(&self) -> (usize, bool) {
        let replicas = self.replicas.as_ref_option().copied().unwrap_or(0).max(0) as usize;
        (replicas, self.prune.as_ref_option().copied().unwrap_or(false))
    }
}

#[async_trait]
impl Resource for ReplicaSetResource {
    type State<'a> = ReplicaSetState<'a>;
    type PrivateState<'a> = ValueEmpty;
    type ProviderMetaState<'a> = ValueEmpty;

    fn schema(&self, _diags: &mut Diagnostics) -> Option<Schema> {
        use AttributeConstraint::{Computed, OptionalComputed, Required};
        Some(Schema {
            version: 1,
            block: Block {
                version: 1,
                description: Description::plain("A CVM's replicas, kept at `replicas` without overshoot"),
                attributes: map! {
                    "id" => attribute(AttributeType::String, Computed, "`{app_id}/{vm_uuid}`"),
                    "app_id" => attribute(AttributeType::String, Required, "The CVM's application"),
                    "vm_uuid" => attribute(AttributeType::String, Required, "The CVM"),
                    "replicas" => attribute(AttributeType::Number, Required, "How many replicas (read: how many are live)"),
                    "prune" => attribute(AttributeType::Bool, OptionalComputed, "Delete surplus this set created (never another writer's); default false"),
                    "ids" => attribute(AttributeType::List(AttributeType::String.into()), Computed, "The live replicas' ids"),
                },
                ..Default::default()
            },
        })
    }

    async fn read<'a>(
        &self,
        diags: &mut Diagnostics,
        state: Self::State<'a>,
        private_state: Self::PrivateState<'a>,
        _meta: Self::ProviderMetaState<'a>,
    ) -> Option<(Self::State<'a>, Self::PrivateState<'a>)> {
        let api = self.shared.api(diags)?;
        let (app_id, vm_uuid) = state.parent();
        match api.read_replicas(&app_id, &vm_uuid).await {
            Ok(ids) => Some((state.with_ids(ids), private_state)),
            Err(e) => {
                diags.root_error("cannot list the replicas", format!("{e:#}"));
                Some((state, private_state))
            }
        }
    }

    async fn plan_create<'a>(
        &self,
        _diags: &mut Diagnostics,
        proposed: Self::State<'a>,
        _config: Self::State<'a>,
        _meta: Self::ProviderMetaState<'a>,
    ) -> Option<(Self::State<'a>, Self::PrivateState<'a>)> {
        let prune = if proposed.prune.is_null() { Value::Value(false) } else { proposed.prune };
        Some((ReplicaSetState { id: Value::Unknown, ids: Value::Unknown, prune, ..proposed }, ValueEmpty::default()))
    }

    async fn plan_update<'a>(
        &self,
        _diags: &mut Diagnostics,
        prior: Self::State<'a>,
        proposed: Self::State<'a>,
        _config: Self::State<'a>,
        private_state: Self::PrivateState<'a>,
        _meta: Self::ProviderMetaState<'a>,
    ) -> Option<(Self::State<'a>, Self::PrivateState<'a>, Vec<AttributePath>)> {
        let mut replace = Vec::new();
        if prior.app_id != proposed.app_id {
            replace.push(AttributePath::new("app_id"));
        }
        if prior.vm_uuid != proposed.vm_uuid {
            replace.push(AttributePath::new("vm_uuid"));
        }
        let mut planned = proposed;
        if planned.prune.is_null() {
            planned.prune = Value::Value(false);
        }
        if planned.replicas != prior.replicas || planned.prune != prior.prune {
            planned.ids = Value::Unknown;
        }
        Some((planned, private_state, replace))
    }

    async fn plan_destroy<'a>(
        &self,
        _diags: &mut Diagnostics,
        _prior: Self::State<'a>,
        private_state: Self::PrivateState<'a>,
        _meta: Self::ProviderMetaState<'a>,
    ) -> Option<Self::PrivateState<'a>> {
        Some(private_state)
    }

    async fn create<'a>(
        &self,
        diags: &mut Diagnostics,
        planned: Self::State<'a>,
        _config: Self::State<'a>,
        private_state: Self::PrivateState<'a>,
        _meta: Self::ProviderMetaState<'a>,
    ) -> Option<(Self::State<'a>, Self::PrivateState<'a>)> {
        self.apply(diags, planned, private_state).await
    }

    async fn update<'a>(
        &self,
        diags: &mut Diagnostics,
        _prior: Self::State<'a>,
        planned: Self::State<'a>,
        _config: Self::State<'a>,
        private_state: Self::PrivateState<'a>,
        _meta: Self::ProviderMetaState<'a>,
    ) -> Option<(Self::State<'a>, Self::PrivateState<'a>)> {
        self.apply(diags, planned, private_state).await
    }

    async fn destroy<'a>(
        &self,
        diags: &mut Diagnostics,
        state: Self::State<'a>,
        _private_state: Self::PrivateState<'a>,
        _meta: Self::ProviderMetaState<'a>,
    ) -> Option<()> {
        let api = self.shared.api(diags)?;
        let (app_id, vm_uuid) = state.parent();
        match api.delete_replicas(&app_id, &vm_uuid).await {
            Ok(()) => Some(()),
            Err(e) => {
                diags.root_error("cannot delete the replicas", format!("{e:#}"));
                None
            }
        }
    }
}

impl ReplicaSetResource {
    /// Makes the set what `planned` says. On a failure, what is there goes into the state, so
    /// nothing made is orphaned.
    async fn apply<'a>(
        &self,
        diags: &mut Diagnostics,
        planned: ReplicaSetState<'a>,
        private_state: ValueEmpty,
    ) -> Option<(ReplicaSetState<'a>, ValueEmpty)> {
        let api = self.shared.api(diags)?;
        let (app_id, vm_uuid) = planned.parent();
        let (replicas, prune) = planned.desired();
        match api.ensure_replicas(&app_id, &vm_uuid, replicas, prune).await {
            Ok(ids) => Some((planned.with_ids(ids), private_state)),
            Err(e) => {
                diags.root_error("the replicas are not as asked", format!("{e:#}"));
                let ids = api.read_replicas(&app_id, &vm_uuid).await.ok()?;
                Some((planned.with_ids(ids), private_state))
            }
        }
    }
}
