//! `terraform-provider-fakecloud`: a Terraform provider for the fake cloud (`cargo run --example
//! fake_cloud`), built on idempotent-retry the way its README tells provider authors to; with
//! feature `naive`, the same provider written the usual way, for comparison. See the README.

mod api;
mod cvm;
mod provider;
mod replica_set;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Two crypto backends are linked (ring for the plugin's TLS, aws-lc-rs for reqwest's):
    // rustls needs to be told which is the default.
    let _ = rustls::crypto::ring::default_provider().install_default();
    tf_provider::serve("fakecloud", provider::FakeCloudProvider::default()).await
}
