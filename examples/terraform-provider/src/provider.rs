//! The provider: its configuration, and the API its resources share once configured.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tf_provider::schema::{Attribute, AttributeConstraint, AttributeType, Block, Description, Schema};
use tf_provider::value::{ValueBool, ValueEmpty, ValueString};
use tf_provider::{Diagnostics, DynamicDataSource, DynamicResource, Provider, map};

use crate::api::{Api, Settings};
use crate::cvm::CvmResource;
use crate::replica_set::ReplicaSetResource;

/// The API, once `configure` has built it.
#[derive(Clone, Default)]
pub struct Shared(Arc<RwLock<Option<Arc<Api>>>>);

impl Shared {
    /// The configured API, or an error diagnostic.
    pub fn api(&self, diags: &mut Diagnostics) -> Option<Arc<Api>> {
        let api = self.0.read().unwrap_or_else(|p| p.into_inner()).clone();
        if api.is_none() {
            diags.root_error_short("the provider is not configured");
        }
        api
    }
}

#[derive(Default)]
pub struct FakeCloudProvider {
    shared: Shared,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Config<'a> {
    #[serde(borrow = "'a")]
    pub endpoint: ValueString<'a>,
    #[serde(borrow = "'a")]
    pub token: ValueString<'a>,
    #[serde(borrow = "'a")]
    pub journal: ValueString<'a>,
    pub adaptive_rate: ValueBool,
}

pub(crate) fn attribute(
    attr_type: AttributeType,
    constraint: AttributeConstraint,
    description: &'static str,
) -> Attribute {
    Attribute { attr_type, constraint, description: Description::plain(description), ..Default::default() }
}

#[async_trait]
impl Provider for FakeCloudProvider {
    type Config<'a> = Config<'a>;
    type MetaState<'a> = ValueEmpty;

    fn schema(&self, _diags: &mut Diagnostics) -> Option<Schema> {
        let token = Attribute {
            sensitive: true,
            ..attribute(AttributeType::String, AttributeConstraint::Optional, "Sent as a bearer token")
        };
        Some(Schema {
            version: 1,
            block: Block {
                description: Description::plain("The fake cloud"),
                attributes: map! {
                    "endpoint" => attribute(AttributeType::String, AttributeConstraint::Required, "The API's base URL"),
                    "token" => token,
                    "journal" => attribute(
                        AttributeType::String,
                        AttributeConstraint::Optional,
                        "The journal of idempotency keys: a SQLite file, or postgres://user@host/db shared by every agent (default: $XDG_STATE_HOME/idempotent-retry/journal.sqlite3)",
                    ),
                    "adaptive_rate" => attribute(
                        AttributeType::Bool,
                        AttributeConstraint::Optional,
                        "Once the API throttles (429), pace every request to it at a rate that adapts, as the AWS SDKs' adaptive retry mode does (default false)",
                    ),
                },
                ..Default::default()
            },
        })
    }

    async fn configure<'a>(&self, diags: &mut Diagnostics, _version: String, config: Self::Config<'a>) -> Option<()> {
        let Some(endpoint) = config.endpoint.as_ref_option() else {
            diags.root_error_short("`endpoint` is required");
            return None;
        };
        let settings = Settings {
            endpoint: endpoint.to_string(),
            token: config.token.as_ref_option().map(|t| t.to_string()),
            journal: config.journal.as_ref_option().map(|p| p.to_string()),
            adaptive_rate: config.adaptive_rate.as_ref_option().copied().unwrap_or(false),
        };
        match Api::new(&settings).await {
            Ok(api) => {
                *self.shared.0.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(api));
                Some(())
            }
            Err(e) => {
                diags.root_error("cannot configure the provider", format!("{e:#}"));
                None
            }
        }
    }

    fn get_resources(&self, _diags: &mut Diagnostics) -> Option<HashMap<String, Box<dyn DynamicResource>>> {
        Some(map! {
            "cvm" => CvmResource { shared: self.shared.clone() },
            "replica_set" => ReplicaSetResource { shared: self.shared.clone() },
        })
    }

    fn get_data_sources(&self, _diags: &mut Diagnostics) -> Option<HashMap<String, Box<dyn DynamicDataSource>>> {
        Some(map! {})
    }
}
