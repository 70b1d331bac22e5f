//! What the fake cloud keeps and returns: one resource (a CVM or a replica).

use serde::{Deserialize, Serialize};

/// A resource as the fake cloud returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Resource {
    /// Server-assigned id (a UUID).
    pub id: String,
    /// The application it belongs to.
    pub app_id: String,
    /// The CVM: its own UUID for a CVM, the parent's for a replica.
    pub vm_uuid: String,
    /// The name given at creation, or a generated one.
    pub name: String,
    /// Creation time, RFC 3339, from the server's clock.
    pub created_at: String,
    /// Lifecycle state: `starting` when created; tests move it with [`FakeCloud::set_status`](super::FakeCloud::set_status).
    pub status: String,
}
