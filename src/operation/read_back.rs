//! Reading back: how to find out whether an operation took effect.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use reqwest_middleware::ClientWithMiddleware;
use serde_json::Value;

use crate::options::RequestOptions;

/// An error from a read-back lookup.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

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

    /// `GET list_url` and find the item whose `field` equals `value`. The items are the
    /// top-level array, or the array under `items` or `data`.
    pub fn find_in_list(list_url: impl Into<String>, field: impl Into<String>, value: impl Into<Value>) -> Self {
        let (url, field, value) = (list_url.into(), field.into(), value.into());
        Self::new(move |client: ClientWithMiddleware| {
            let (url, field, value) = (url.clone(), field.clone(), value.clone());
            async move {
                let request = client.get(&url).with_extension(RequestOptions::new().buffer_body());
                let response = request.send().await?.error_for_status()?;
                let list: Value = serde_json::from_slice(&response.bytes().await?)?;
                Ok(items(&list).and_then(|items| items.iter().find(|item| item.get(&field) == Some(&value)).cloned()))
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

/// The items of a list response: the top-level array, or the array under `items` or `data`.
pub fn items(list: &Value) -> Option<&Vec<Value>> {
    list.as_array()
        .or_else(|| list.get("items").and_then(Value::as_array))
        .or_else(|| list.get("data").and_then(Value::as_array))
}
