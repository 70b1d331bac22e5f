//! `fakecloud_cvm`: a CVM, created once however the apply goes, waited for until it runs.

use std::borrow::Cow;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tf_provider::schema::{AttributeConstraint, AttributeType, Block, Description, Schema};
use tf_provider::value::{Value, ValueEmpty, ValueString};
use tf_provider::{AttributePath, Diagnostics, Resource, map};

use crate::api::Cvm;
use crate::provider::{Shared, attribute};

pub struct CvmResource {
    pub shared: Shared,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct CvmState<'a> {
    #[serde(borrow = "'a")]
    pub id: ValueString<'a>,
    #[serde(borrow = "'a")]
    pub name: ValueString<'a>,
    #[serde(borrow = "'a")]
    pub image: ValueString<'a>,
    #[serde(borrow = "'a")]
    pub app_id: ValueString<'a>,
    #[serde(borrow = "'a")]
    pub status: ValueString<'a>,
}

pub(crate) fn text<'a>(value: String) -> ValueString<'a> {
    Value::Value(Cow::Owned(value))
}

impl<'a> CvmState<'a> {
    fn with(mut self, cvm: Cvm) -> Self {
        self.id = text(cvm.id);
        self.name = text(cvm.name);
        self.app_id = text(cvm.app_id);
        self.status = text(cvm.status);
        self
    }

    fn cvm(&self) -> Cvm {
        let get = |v: &ValueString<'a>| v.as_ref_option().map(|s| s.to_string()).unwrap_or_default();
        Cvm { id: get(&self.id), name: get(&self.name), app_id: get(&self.app_id), status: get(&self.status) }
    }
}

#[async_trait]
impl Resource for CvmResource {
    type State<'a> = CvmState<'a>;
    type PrivateState<'a> = ValueEmpty;
    type ProviderMetaState<'a> = ValueEmpty;

    fn schema(&self, _diags: &mut Diagnostics) -> Option<Schema> {
        use AttributeConstraint::{Computed, Required};
        Some(Schema {
            version: 1,
            block: Block {
                version: 1,
                description: Description::plain("A CVM: created once, however the apply goes, and ready when created"),
                attributes: map! {
                    "id" => attribute(AttributeType::String, Computed, "The CVM's id"),
                    "name" => attribute(AttributeType::String, Required, "Its name; a new name replaces it"),
                    "image" => attribute(AttributeType::String, Required, "Its image; a new image replaces it"),
                    "app_id" => attribute(AttributeType::String, Required, "Its application"),
                    "status" => attribute(AttributeType::String, Computed, "`running` once created; anything else after a failed create (tainted)"),
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
        let Some(id) = state.id.as_ref_option().map(|id| id.to_string()) else {
            return Some((state, private_state));
        };
        match api.read_cvm(&id).await {
            Ok(Some(cvm)) => Some((state.with(cvm), private_state)),
            Ok(None) => None,
            Err(e) => {
                diags.root_error("cannot read the CVM", format!("{e:#}"));
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
        Some((CvmState { id: Value::Unknown, status: Value::Unknown, ..proposed }, ValueEmpty::default()))
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
        for (field, before, after) in [
            ("name", &prior.name, &proposed.name),
            ("image", &prior.image, &proposed.image),
            ("app_id", &prior.app_id, &proposed.app_id),
        ] {
            if before != after {
                replace.push(AttributePath::new(field));
            }
        }
        Some((proposed, private_state, replace))
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
        let api = self.shared.api(diags)?;
        let want = planned.cvm();
        let image = planned.image.as_ref_option().map(|s| s.to_string()).unwrap_or_default();
        match api.create_cvm(&want.name, &image, &want.app_id).await {
            Ok(cvm) => Some((planned.with(cvm), private_state)),
            Err(failure) => {
                diags.root_error("the CVM was not created ready", failure.message);
                // Created but not ready: into the state (Terraform taints it), not orphaned.
                failure.created.map(|cvm| (planned.with(cvm), private_state))
            }
        }
    }

    async fn update<'a>(
        &self,
        _diags: &mut Diagnostics,
        _prior: Self::State<'a>,
        planned: Self::State<'a>,
        _config: Self::State<'a>,
        private_state: Self::PrivateState<'a>,
        _meta: Self::ProviderMetaState<'a>,
    ) -> Option<(Self::State<'a>, Self::PrivateState<'a>)> {
        // Every attribute that can change replaces the CVM: nothing to update in place.
        Some((planned, private_state))
    }

    async fn destroy<'a>(
        &self,
        diags: &mut Diagnostics,
        state: Self::State<'a>,
        _private_state: Self::PrivateState<'a>,
        _meta: Self::ProviderMetaState<'a>,
    ) -> Option<()> {
        let api = self.shared.api(diags)?;
        match api.delete_cvm(&state.cvm()).await {
            Ok(()) => Some(()),
            Err(e) => {
                diags.root_error("cannot delete the CVM", format!("{e:#}"));
                None
            }
        }
    }
}
