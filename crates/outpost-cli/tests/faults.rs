//! `outpost faults --quick` runs in the test suite: every scenario of the fault kit, on a
//! private broker, must keep its promise (nothing missing but the poison events, which are
//! parked; no event of a key after a later one; in doubt only Kafka-first publishes in
//! flight when their process was killed), and print its figures. RELIABILITY.md has a full
//! run's.
//!
//! Needs PostgreSQL, Redis and the tansu binary (`OUTPOST_TANSU_BIN`); run `make services`.

mod support;

use serde_json::Value;

#[test]
fn every_fault_scenario_keeps_its_promise() {
    let out = support::outpost_std()
        .args(["faults", "--quick", "--json"])
        .output()
        .expect("run outpost faults");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "outpost faults failed: {stderr}\n{stdout}"
    );
    let report: Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    let scenarios = report["scenarios"].as_array().expect("scenarios");
    assert_eq!(scenarios.len(), 10, "{report}");
    for s in scenarios {
        let v = &s["verify"];
        assert_eq!(s["kept"], true, "{s}");
        assert!(v["committed"].as_u64().unwrap() > 0, "{s}");
        assert_eq!(v["order_violations"], 0, "{s}");
        // A publish is in doubt only when Kafka-first's process died during it.
        let in_doubt = v["in_doubt"].as_u64().unwrap();
        if s["scenario"] == "publisher-kill-kafka-first" {
            assert!(in_doubt <= s["kills"].as_u64().unwrap(), "{s}");
        } else {
            assert_eq!(in_doubt, 0, "{s}");
        }
        // Every fault that ends is followed by a recovery time (all it committed arrived).
        if s["scenario"] != "poison" {
            assert!(s["recovery_ms"].as_i64().is_some(), "{s}");
        }
        // Only poison is ever missing, and then parked.
        let poisoned = s["load"]["poisoned"].as_u64().unwrap();
        assert_eq!(v["missing"], poisoned, "{s}");
        assert_eq!(v["parked"], poisoned, "{s}");
        assert_eq!(
            v["delivered"].as_u64().unwrap() + poisoned,
            v["committed"].as_u64().unwrap(),
            "{s}"
        );
    }
    let poison = scenarios
        .iter()
        .find(|s| s["scenario"] == "poison")
        .unwrap();
    assert!(poison["load"]["poisoned"].as_u64().unwrap() > 0, "{poison}");
    for killed in [
        "relay-kills",
        "publisher-kill-transactional",
        "publisher-kill-kafka-first",
    ] {
        let s = scenarios.iter().find(|s| s["scenario"] == killed).unwrap();
        assert!(s["kills"].as_u64().unwrap() > 0, "{s}");
    }
}
