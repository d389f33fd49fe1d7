use super::*;
use crate::store::OutboxRecord;
use serde_json::json;

fn desired(version: u64, text: &str) -> DesiredState {
    DesiredState {
        version,
        deployment: text.into(),
        artifacts: BTreeMap::new(),
        precompiled: Vec::new(),
        system: None,
        signature: None,
        key_id: None,
    }
}

#[test]
fn artifact_sizes_are_signed_with_the_text_and_fingerprints_tell_copies_apart() {
    let (pem, public) = generate_key().unwrap();
    let key = parse_public_key(&public).unwrap();
    let mut d = desired(3, "[[workloads]]\n");
    d.artifacts.insert("ab".repeat(32), 4096);
    let (sig, id) = sign_desired(pem.as_bytes(), "n1", &d).unwrap();
    d.signature = Some(sig);
    d.key_id = Some(id);
    verify(&d, "n1", std::slice::from_ref(&key)).unwrap();
    let text = String::from_utf8(signed_bytes("n1", &d)).unwrap();
    assert_eq!(
        text,
        format!(
            "lichen-desired-v2\nn1\n3\n1\n{} 4096\n[[workloads]]\n",
            "ab".repeat(32)
        )
    );
    // A bigger size (a forger's way to make the node fetch more) breaks the signature.
    let mut bigger = d.clone();
    bigger.artifacts.insert("ab".repeat(32), 512 << 20);
    let err = verify(&bigger, "n1", std::slice::from_ref(&key))
        .unwrap_err()
        .to_string();
    assert!(err.contains("bad signature"), "{err}");
    // Without artifacts the v1 bytes are signed, as before.
    assert_eq!(
        signed_bytes("n1", &desired(3, "x")),
        canonical_bytes("n1", 3, "x")
    );
    // Same version, other signature: another message, refused or not on its own.
    let mut forged = d.clone();
    forged.signature = Some(base64_encode(&[0; 64]));
    assert_ne!(fingerprint(&forged), fingerprint(&d));
    assert_eq!(fingerprint(&d.clone()), fingerprint(&d));
}

#[tokio::test]
async fn the_quota_drops_the_oldest_telemetry_first_and_never_state_or_results() {
    use crate::store::{NewDeployment, NewWorkload, StoreOptions};
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(&dir.path().join("s.db"), StoreOptions::default()).unwrap();
    store
        .apply_deployment(NewDeployment {
            source_name: "t".into(),
            source_text: String::new(),
            digest: String::new(),
            description: None,
            workloads: ["a", "b"]
                .map(|n| NewWorkload {
                    name: n.into(),
                    spec_json: "{}".into(),
                    module_digest: "x".into(),
                })
                .to_vec(),
        })
        .await
        .unwrap();
    let push = |kind: &str, workload: &str, tag: u32| OutboxRecord {
        kind: kind.into(),
        workload: workload.into(),
        stream: if kind == "telemetry" {
            "s".into()
        } else {
            String::new()
        },
        payload: format!("{{\"tag\":{tag},\"pad\":\"{}\"}}", "x".repeat(80)).into_bytes(),
        created_at_ms: 1,
    };
    // Oldest first: a result, then telemetry of a and b interleaved, state in between.
    store.push_outbox(push("cmd-result", "a", 0)).await.unwrap();
    for tag in 1..=10 {
        let w = if tag % 2 == 1 { "a" } else { "b" };
        store.push_outbox(push("telemetry", w, tag)).await.unwrap();
        if tag == 5 {
            store.push_outbox(push("state", "", 100)).await.unwrap();
        }
    }
    let row = 100 + crate::store::OUTBOX_ROW_OVERHEAD;
    // Room for 8 rows of the 12: 4 must go, all telemetry, the 4 oldest (tags 1-4).
    let mut quota = Quota::new(8 * row);
    let plan = drop_over_quota(&store, &mut quota)
        .await
        .unwrap()
        .expect("over");
    assert_eq!(plan.ids.len(), 4, "{plan:?}");
    assert_eq!(plan.per_workload.get("a"), Some(&2));
    assert_eq!(plan.per_workload.get("b"), Some(&2));
    let left: Vec<(String, u64)> = store
        .outbox_peek(100)
        .unwrap()
        .into_iter()
        .map(|r| {
            let v: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
            (r.kind, v["tag"].as_u64().unwrap())
        })
        .collect();
    let tags: Vec<u64> = left.iter().map(|(_, t)| *t).collect();
    assert_eq!(tags, vec![0, 5, 100, 6, 7, 8, 9, 10], "{left:?}");
    assert!(drop_over_quota(&store, &mut quota).await.unwrap().is_none());
    // Below the size of what may never be dropped: every telemetry row goes, the rest stays.
    let mut tiny = Quota::new(row);
    let plan = drop_over_quota(&store, &mut tiny)
        .await
        .unwrap()
        .expect("over");
    assert_eq!(plan.ids.len(), 6);
    assert!(plan.still_over > 0);
    let kinds: Vec<String> = store
        .outbox_peek(100)
        .unwrap()
        .into_iter()
        .map(|r| r.kind)
        .collect();
    assert_eq!(kinds, vec!["cmd-result", "state"]);
}

#[test]
fn an_mqtts_url_needs_a_ca_file() {
    let err = format!(
        "{:#}",
        session_config("mqtts://h", "n", None, None, None).unwrap_err()
    );
    assert!(err.contains("CA file"), "{err}");
}

#[test]
fn desired_state_refuses_unknown_fields() {
    let ok: DesiredState =
        serde_json::from_value(json!({"version": 1, "deployment": "x"})).unwrap();
    assert_eq!(ok.version, 1);
    assert!(serde_json::from_value::<DesiredState>(json!({"version": 1})).is_err());
    assert!(
        serde_json::from_value::<DesiredState>(
            json!({"version": 1, "deployment": "x", "extra": 1})
        )
        .is_err()
    );
}
