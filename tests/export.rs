//! A relay's checkpoint, exported as safetensors, holds exactly the run's global parameters,
//! and Python's `safetensors` + numpy read it (`cargo xtask test` installs them from PyPI and
//! points `SWARMTRAIN_PYTHON` at that interpreter).

use swarmtrain_relay::digits_run;
use swarmtrain_shared::checkpoint::from_safetensors;
use swarmtrain_shared::protocol::params_from_bytes;
use swarmtrain_tests::{init_logging, start_relay, train_peers};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exported_checkpoint_matches_the_relay_and_loads_in_python() {
    init_logging();
    let mut run = digits_run();
    run.inner.steps = 20;
    run.quorum = 2;
    let relay = start_relay(run).await;
    let status = train_peers(&relay, 2, 2).await;
    assert!(
        status.round >= 2,
        "two rounds trained, round is {}",
        status.round
    );

    // `swarmtrain-relay credits` reads the leaderboard: both peers, each with its updates.
    let (run, board) = swarmtrain_relay::ops::leaderboard(&relay.url(), None, 10)
        .await
        .expect("leaderboard");
    assert_eq!(run, "digits");
    assert_eq!(board["peers"], 2, "{board}");
    let top = board["top"].as_array().expect("rows");
    assert_eq!(top.len(), 2, "{board}");
    for row in top {
        assert!(row["accepted_updates"].as_u64() >= Some(2), "{board}");
        assert_eq!(
            row["samples"].as_u64(),
            row["accepted_updates"]
                .as_u64()
                .map(|n| n * 20 * u64::from(digits_run().inner.batch_size)),
            "{board}"
        );
    }

    let (file, exported) = swarmtrain_relay::ops::export(&relay.url())
        .await
        .expect("export");
    let checkpoint = from_safetensors(&file).expect("a valid safetensors file");
    let hash = exported["params_hash"].as_str().expect("hash").to_owned();
    let url = format!("{}api/runs/digits/params/{hash}", relay.url());
    let wire = params_from_bytes(
        &reqwest::get(&url)
            .await
            .expect("GET")
            .bytes()
            .await
            .expect("body"),
    )
    .expect("params");
    assert_eq!(
        checkpoint.flat(),
        wire,
        "the checkpoint holds the global parameters, bit for bit"
    );
    let names: Vec<&str> = checkpoint
        .tensors
        .iter()
        .map(|(t, _)| t.name.as_str())
        .collect();
    assert_eq!(names, ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]);
    assert_eq!(checkpoint.metadata["params_blake3"], hash);
    assert_eq!(checkpoint.metadata["round"], exported["round"].to_string());
    // The file describes itself: the model, the run's seed (θ₀ and the held-out split) and
    // the run's settings, as the relay's status shows them.
    let spec: serde_json::Value =
        serde_json::from_str(&checkpoint.metadata["spec"]).expect("the spec is JSON");
    assert_eq!(spec, exported["spec"]);
    assert_eq!(checkpoint.metadata["seed"], "7", "relay_config's seed");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&checkpoint.metadata["model"]).expect("JSON"),
        exported["spec"]["model"]
    );

    let Some(python) = std::env::var_os("SWARMTRAIN_PYTHON") else {
        println!("SKIPPED python check: SWARMTRAIN_PYTHON is not set (`cargo xtask test` sets it)");
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("model.safetensors"), &file).expect("write");
    let mut expected = serde_json::Map::new();
    for (info, values) in &checkpoint.tensors {
        expected.insert(
            info.name.clone(),
            serde_json::json!({ "shape": info.shape, "values": values }),
        );
    }
    expected.insert(
        "__metadata__".into(),
        serde_json::to_value(&checkpoint.metadata).expect("json"),
    );
    std::fs::write(
        dir.path().join("expected.json"),
        serde_json::to_vec(&expected).expect("json"),
    )
    .expect("write");
    let script = swarmtrain_tests::package_path("python/read_checkpoint.py");
    let out = std::process::Command::new(python)
        .arg(script)
        .arg(dir.path().join("model.safetensors"))
        .arg(dir.path().join("expected.json"))
        .output()
        .expect("run python");
    println!("{}", String::from_utf8_lossy(&out.stdout));
    assert!(
        out.status.success(),
        "python could not read the checkpoint: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    relay.shutdown().await;
}
