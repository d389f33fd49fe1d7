use super::*;
use crate::plan::{Function, ModelProperty, ValueType};

fn prop(name: &str, desired: Option<&str>, get: Option<&str>) -> PropertyPlan {
    PropertyPlan {
        name: name.into(),
        model: ModelProperty {
            value_type: ValueType::String,
            writable: true,
            minimum: None,
            maximum: None,
        },
        desired: desired.map(str::to_owned),
        set_command: format!("set-{name}"),
        get_command: get.map(str::to_owned),
        stream: name.into(),
        field: None,
        report_cycle: Duration::from_secs(1),
        collect_cycle: Duration::from_secs(1),
        report_to_cloud: true,
    }
}

fn plan(props: Vec<PropertyPlan>) -> DevicePlan {
    DevicePlan {
        id: ResourceId::new("default", "led-1"),
        model: ResourceId::new("default", "m"),
        function: Function::Attached("w".into()),
        properties: props,
    }
}

fn reported(r: &Report) -> Vec<(String, String)> {
    match r {
        Report::Twins(t) => t
            .reported_device
            .as_ref()
            .unwrap()
            .twins
            .iter()
            .map(|t| {
                (
                    t.property_name.clone(),
                    t.reported.as_ref().unwrap().value.clone(),
                )
            })
            .collect(),
        Report::State(s) => vec![("state".into(), s.state.clone())],
    }
}

#[test]
fn a_desired_value_is_delivered_once_and_its_reply_is_reported_on_the_next_cycle() {
    let t0 = Instant::now();
    let mut twin = DeviceTwin::new(&plan(vec![prop("led", Some("on"), None)]), t0);
    let cmds = twin.pending_desired(t0);
    assert_eq!(cmds.len(), 1);
    assert_eq!(
        (cmds[0].name.as_str(), cmds[0].payload.as_slice()),
        ("set-led", &b"on"[..])
    );
    twin.on_reply(&cmds[0], Some(b"on"));
    assert!(twin.pending_desired(t0).is_empty(), "delivered once");
    assert!(twin.due_report(t0).is_none(), "not before the report cycle");
    let r = twin.due_report(t0 + Duration::from_secs(1)).unwrap();
    assert_eq!(reported(&r), vec![("led".into(), "on".into())]);
    if let Report::Twins(t) = &r {
        let twin = &t.reported_device.as_ref().unwrap().twins[0];
        assert_eq!(twin.observed_desired.as_ref().unwrap().value, "on");
        assert_eq!(twin.reported.as_ref().unwrap().metadata["type"], "string");
    }
    assert!(
        twin.due_report(t0 + Duration::from_secs(2)).is_none(),
        "an unchanged value is not reported again"
    );
}

#[test]
fn a_failed_delivery_is_retried_a_cycle_later_and_a_new_desired_value_goes_again() {
    let t0 = Instant::now();
    let mut twin = DeviceTwin::new(&plan(vec![prop("led", Some("on"), None)]), t0);
    let cmd = twin.pending_desired(t0).remove(0);
    twin.on_failure(&cmd, "workload is backing off".into(), t0);
    assert!(twin.pending_desired(t0).is_empty());
    assert_eq!(twin.next_deadline(t0), t0 + Duration::from_secs(1));
    assert_eq!(twin.pending_desired(t0 + Duration::from_secs(1)).len(), 1);
    assert!(twin.errors()[0].1.contains("backing off"));
    twin.on_reply(&cmd, None);
    assert!(twin.pending_desired(t0 + Duration::from_secs(1)).is_empty());
    twin.update(&plan(vec![prop("led", Some("off"), None)]), t0);
    let again = twin.pending_desired(t0);
    assert_eq!(again[0].payload, b"off");
}

#[test]
fn telemetry_and_get_replies_become_reported_values_that_fit_the_model() {
    let t0 = Instant::now();
    let mut temp = prop("temperature", None, None);
    temp.model.value_type = ValueType::Float;
    temp.field = Some("celsius".into());
    let mut twin = DeviceTwin::new(&plan(vec![prop("led", None, Some("led")), temp]), t0);
    let t1 = t0 + Duration::from_secs(1);
    let gets = twin.due_collects(t1);
    assert_eq!(gets.len(), 1, "only led has a get command");
    assert_eq!(gets[0].name, "led");
    twin.on_reply(&gets[0], Some(b"off"));
    twin.on_telemetry("temperature", br#"{"celsius": 21.5, "raw": 3}"#);
    let r = twin.due_report(t1).unwrap();
    assert_eq!(
        reported(&r),
        vec![
            ("led".into(), "off".into()),
            ("temperature".into(), "21.5".into())
        ]
    );
    twin.on_telemetry("temperature", br#"{"celsius": "warm"}"#);
    assert!(
        twin.due_report(t1 + Duration::from_secs(1)).is_none(),
        "a non-float is not taken"
    );
    assert!(
        twin.errors()
            .iter()
            .any(|(p, e)| p == "temperature" && e.contains("not a float"))
    );
}

#[test]
fn the_device_state_follows_health_and_is_reported_on_change_only() {
    let mut twin = DeviceTwin::new(&plan(vec![]), Instant::now());
    let r = twin.on_health(Some(&Health::Starting)).unwrap();
    assert_eq!(reported(&r), vec![("state".into(), "unknown".into())]);
    let r = twin.on_health(Some(&Health::Running)).unwrap();
    assert_eq!(reported(&r), vec![("state".into(), "online".into())]);
    assert!(twin.on_health(Some(&Health::Running)).is_none());
    let r = twin
        .on_health(Some(&Health::Down("trapped".into())))
        .unwrap();
    assert_eq!(reported(&r), vec![("state".into(), "offline".into())]);
    assert!(twin.on_health(None).is_none(), "missing is offline too");
}

#[test]
fn values_are_extracted_from_json_or_text() {
    assert_eq!(extract(b"on", None).unwrap(), "on");
    assert_eq!(extract(b"\"on\"", None).unwrap(), "on");
    assert_eq!(extract(b"21.5", None).unwrap(), "21.5");
    assert_eq!(extract(br#"{"value": true}"#, None).unwrap(), "true");
    assert_eq!(extract(br#"{"a": 1, "b": "x"}"#, Some("b")).unwrap(), "x");
    assert!(
        extract(br#"{"a": 1}"#, Some("b"))
            .unwrap_err()
            .to_string()
            .contains("no key")
    );
    assert!(extract(&[0xff, 0xfe], None).is_err());
}
