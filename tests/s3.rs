//! Checkpoints in S3-compatible storage: a relay process writes its checkpoints to a bucket on
//! a local S3 server (moto, from PyPI, which `cargo xtask test` installs), is killed with
//! SIGKILL, and resumes from the bucket.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use swarmtrain_relay::digits_run;
use swarmtrain_relay::ops::model_layout;
use swarmtrain_relay::store::Store;
use swarmtrain_shared::protocol::{ParamsHash, params_to_bytes};
use swarmtrain_tests::{RelayProcess, free_port, two_peers_close_round_0};

/// A moto S3 server on loopback, stopped when dropped.
struct S3Server {
    child: Child,
    endpoint: String,
}

impl S3Server {
    fn start(python: &std::ffi::OsStr) -> Self {
        let port = free_port();
        let child = Command::new(python)
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto");
        Self {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        }
    }

    /// Sends an unsigned S3 request (moto accepts any credentials) once the server is up.
    async fn request(&self, method: reqwest::Method, path: &str) -> (reqwest::StatusCode, Vec<u8>) {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match client
                .request(method.clone(), format!("{}{path}", self.endpoint))
                .send()
                .await
            {
                Ok(response) => {
                    let status = response.status();
                    return (status, response.bytes().await.expect("body").to_vec());
                }
                Err(e) => assert!(Instant::now() < deadline, "moto did not come up: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_go_to_an_s3_bucket_and_a_restarted_relay_resumes_from_it() {
    let Some(python) = std::env::var_os("SWARMTRAIN_PYTHON") else {
        println!(
            "SKIPPED S3 check: SWARMTRAIN_PYTHON is not set (`cargo xtask test` sets it and installs moto)"
        );
        return;
    };
    let s3 = S3Server::start(&python);
    let (status, body) = s3.request(reqwest::Method::PUT, "/checkpoints").await;
    assert!(
        status.is_success(),
        "create the bucket: {status} {}",
        String::from_utf8_lossy(&body)
    );

    let env = [
        ("AWS_ENDPOINT", s3.endpoint.as_str()),
        ("AWS_ALLOW_HTTP", "true"),
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_REGION", "us-east-1"),
    ];
    let args = ["--checkpoint-store", "s3://checkpoints/relay-a"];
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let relay = RelayProcess::start(dir.path(), port, &args, &env);
    let address = relay.tcp_address().await;
    let peers = two_peers_close_round_0(&address).await;
    let before = relay.json("api/status").await;
    assert_eq!(before["round"], 1);

    // Both rounds' checkpoints are objects in the bucket, not files in the data directory.
    let (status, listing) = s3
        .request(
            reqwest::Method::GET,
            "/checkpoints?list-type=2&prefix=relay-a/",
        )
        .await;
    let listing = String::from_utf8_lossy(&listing);
    assert!(status.is_success(), "{status} {listing}");
    for key in [
        "relay-a/digits/round-00000000.safetensors",
        "relay-a/digits/round-00000001.safetensors",
    ] {
        assert!(listing.contains(key), "{key} is in the bucket: {listing}");
    }
    assert!(
        !dir.path().join("checkpoints/digits").exists(),
        "no local checkpoints"
    );

    relay.kill();
    drop(peers);
    let relay = RelayProcess::start(dir.path(), port, &args, &env);
    let after = relay.json("api/status").await;
    for key in ["round", "params_hash", "history"] {
        assert_eq!(after[key], before[key], "{key} resumes from the bucket");
    }

    // The bucket's checkpoint of round 1 holds θ_1: the parameters the relay announces.
    let reader_dir = tempfile::tempdir().expect("tempdir");
    let options = env.iter().map(|(k, v)| (k.to_lowercase(), (*v).to_owned()));
    let store = Store::open_at_with(reader_dir.path(), "s3://checkpoints/relay-a", options)
        .expect("open the bucket");
    let layout = model_layout(&digits_run().model);
    let (params, velocity) = store
        .read_checkpoint("digits/round-00000001.safetensors", &layout)
        .await
        .expect("read");
    assert_eq!(
        ParamsHash::of(&params_to_bytes(&params)).to_hex(),
        after["params_hash"].as_str().expect("hash")
    );
    assert!(
        velocity.iter().any(|v| *v != 0.0),
        "the outer momentum is kept too"
    );
    // A round checkpoint describes itself as an exported one does: model, seed and settings.
    let file = store
        .read_checkpoint_file("digits/round-00000001.safetensors")
        .await
        .expect("read");
    let spec: serde_json::Value = serde_json::from_str(&file.metadata["spec"]).expect("JSON");
    assert_eq!(spec, before["spec"]);
    assert_eq!(file.metadata["seed"], before["spec"]["seed"].to_string());
    assert_eq!(file.metadata["params_blake3"], before["params_hash"]);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&file.metadata["model"]).expect("JSON"),
        before["spec"]["model"]
    );
}
