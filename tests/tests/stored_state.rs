//! A deployment stored by an older agent with values out of today's bounds: the agent comes up,
//! reports those workloads failed (ps, events), runs the others and answers its API, at every
//! start (no crash loop).

use lichen_agent::api::types::WorkloadState;
use lichen_tests::{Daemon, guest, one_workload, output_text};

#[test]
fn a_deployment_stored_out_of_bounds_fails_its_workloads_and_the_agent_comes_up() {
    let mut daemon = Daemon::start().unwrap();
    let text: String = ["good", "years", "deep"]
        .iter()
        .map(|name| {
            one_workload(
                name,
                &guest("counter"),
                "triggers = [{ interval = \"1s\" }]",
            )
        })
        .collect();
    let out = daemon.deploy("site.toml", &text);
    assert!(out.status.success(), "{}", output_text(&out));
    daemon.wait_for("deep", "running", |s| s.state == WorkloadState::Running);
    daemon.stop().unwrap();

    // What an agent without bounds would have committed, written into the real database.
    let db = rusqlite::Connection::open(daemon.state_dir().join("lichen.db")).unwrap();
    db.execute(
        "UPDATE workloads SET spec_json = replace(spec_json, '\"1s\"', '\"500000000000years\"') \
         WHERE name = 'years'",
        [],
    )
    .unwrap();
    db.execute(
        "UPDATE workloads SET spec_json = replace(spec_json, '\"limits\":{}', \
         '\"limits\":{\"queue\":4000000000000000000}') WHERE name = 'deep'",
        [],
    )
    .unwrap();
    db.execute(
        "UPDATE deployments SET source_text = replace(source_text, 'interval = \"1s\"', \
         'interval = \"500000000000y\"')",
        [],
    )
    .unwrap();
    let changed: i64 = db
        .query_row(
            "SELECT count(*) FROM workloads WHERE spec_json LIKE '%500000000000years%' \
             OR spec_json LIKE '%4000000000000000000%'",
            [],
            |row| row.get(0),
        )
        .unwrap();
    assert_eq!(changed, 2);
    drop(db);

    for start in 0..2 {
        daemon.restart().unwrap();
        daemon.wait_for("good", "running", |s| s.state == WorkloadState::Running);
        let years = daemon.status("years").expect("listed");
        assert_eq!(years.state, WorkloadState::Failed, "start {start}");
        let error = years.last_error.unwrap_or_default();
        assert!(
            error.contains("triggers[0].interval") && error.contains("at most 1year"),
            "{error}"
        );
        let deep = daemon.status("deep").expect("listed");
        assert_eq!(deep.state, WorkloadState::Failed);
        let error = deep.last_error.unwrap_or_default();
        assert!(error.contains("limits.queue"), "{error}");
        let events = daemon.cli_json(&["events", "--limit", "1000"]).unwrap();
        for name in ["years", "deep"] {
            let failed = events
                .as_array()
                .unwrap()
                .iter()
                .filter(|e| e["kind"] == "start-failed" && e["workload"] == name)
                .count();
            assert_eq!(failed, start + 1, "{name}: {events}");
        }
        let out = daemon.cli(&["send", "good", "get"]);
        assert!(out.status.success(), "{}", output_text(&out));
        let out = daemon.cli(&["send", "years", "get"]);
        assert!(
            output_text(&out).contains("workload \"years\" is failed"),
            "{}",
            output_text(&out)
        );
        daemon.stop().unwrap();
    }
}
