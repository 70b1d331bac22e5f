//! Reading back: how to find out whether an operation took effect.

use std::future::Future;
use std::ops::ControlFlow;
use std::pin::Pin;
use std::sync::Arc;

use reqwest_middleware::ClientWithMiddleware;
use serde_json::Value;

use crate::error::BoxError;
use crate::options::RequestOptions;
use crate::pagination::{ListFailure, Pagination};

type Lookup =
    dyn Fn(ClientWithMiddleware) -> Pin<Box<dyn Future<Output = Result<Option<Value>, BoxError>> + Send>> + Send + Sync;

/// How to find out whether an operation took effect: a lookup that returns the resource, if it
/// exists.
///
/// It runs when an outcome is unknown. It must see what the create did: look an item up by a
/// name or id the create chose, on a read that does not lag (or use the reconcile engine, which
/// tolerates lag).
///
/// ```
/// use idempotent_retry::operation::ReadBack;
///
/// // The common case: list the collection and find the item by the name the create gave it.
/// let by_name = ReadBack::find_in_list("https://cloud.example/cvms", "name", "web-1");
///
/// // Anything else: an async function of the client.
/// let by_id = ReadBack::new(|client: reqwest_middleware::ClientWithMiddleware| async move {
///     let response = client.get("https://cloud.example/cvms/by-name/web-1").send().await?;
///     if response.status() == 404 {
///         return Ok(None);
///     }
///     Ok(Some(serde_json::from_slice(&response.bytes().await?)?))
/// });
/// # let _ = (by_name, by_id);
/// ```
#[derive(Clone)]
pub struct ReadBack(Arc<Lookup>);

impl ReadBack {
    /// A lookup from an async function of the client.
    pub fn new<F, Fut>(lookup: F) -> Self
    where
        F: Fn(ClientWithMiddleware) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Option<Value>, BoxError>> + Send + 'static,
    {
        Self(Arc::new(move |client| Box::pin(lookup(client))))
    }

    /// `GET list_url` and find the item whose `field` equals `value`, page after page as
    /// [`Pagination::standard`] follows them. The items are the top-level array, or the array
    /// under `items`, `data` or `results`. A list that says there is more but cannot be followed
    /// is an error: "not found" on its first page proves nothing.
    pub fn find_in_list(list_url: impl Into<String>, field: impl Into<String>, value: impl Into<Value>) -> Self {
        Self::find_in_pages(list_url, field, value, Pagination::standard())
    }

    /// [`find_in_list`](Self::find_in_list), with the list's pages led to one another as
    /// `pagination` says.
    pub fn find_in_pages(
        list_url: impl Into<String>,
        field: impl Into<String>,
        value: impl Into<Value>,
        pagination: Pagination,
    ) -> Self {
        let (url, field, value) = (list_url.into(), field.into(), value.into());
        Self::new(move |client: ClientWithMiddleware| {
            let (url, field, value, pagination) = (url.clone(), field.clone(), value.clone(), pagination.clone());
            async move {
                let first = crate::target::http_url(&url)?;
                let mut found = None;
                let (_, listed) = pagination
                    .each_page(&client, &first, None, "id", RequestOptions::new, |page| {
                        found = page.into_iter().find(|item| item.get(&field) == Some(&value));
                        if found.is_some() { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
                    })
                    .await;
                match listed {
                    Ok(()) => Ok(found),
                    Err(ListFailure::Request(e)) => Err(e.into()),
                    Err(ListFailure::Status(status)) => {
                        Err(format!("GET {} answered {status}", crate::target::redact(&first)).into())
                    }
                    Err(ListFailure::Invalid(why)) => Err(why.into()),
                }
            }
        })
    }

    pub(crate) async fn lookup(&self, client: &ClientWithMiddleware) -> Result<Option<Value>, BoxError> {
        (self.0)(client.clone()).await
    }
}

impl std::fmt::Debug for ReadBack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReadBack(..)")
    }
}
