//! One device's twin: what to send its function and what to report, as plain decisions
//! driven by the device's task (no I/O here, times are given).
//!
//! - A writable property's desired value goes to the function as its set command (payload: the
//!   value) until one delivery succeeds; a failed one is tried again a report cycle later. A
//!   changed desired value (UpdateDevice) is delivered again.
//! - The reported value comes from the function: its reply to the set or get command, or a
//!   telemetry record on the property's stream. A value that does not fit the model's type is
//!   not reported (and kept as the property's last error).
//! - Every report cycle, a property whose reported value changed since it was last queued is
//!   reported; all such properties of one device due at one moment go in one report.
//! - The device state follows its function's health and is reported when it changes.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::host::{DeviceState, Health};
use crate::plan::{DevicePlan, PropertyPlan, ResourceId};
use crate::proto::v1beta1 as pb;
use crate::queue::Report;

/// A command the device's task must send to its function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// The property it is for.
    pub property: String,
    /// Command name.
    pub name: String,
    /// Payload.
    pub payload: Vec<u8>,
    /// For a set command: the desired value it delivers.
    pub delivers: Option<String>,
}

#[derive(Debug, Clone)]
struct PropState {
    plan: PropertyPlan,
    /// The desired value the function has taken.
    delivered: Option<String>,
    /// Not before this instant is the desired value tried again.
    retry_at: Option<Instant>,
    reported: Option<(String, u64)>,
    /// The reported value last put in a report.
    queued: Option<String>,
    next_report: Instant,
    next_collect: Instant,
    last_error: Option<String>,
}

/// The twin of one device.
#[derive(Debug, Clone)]
pub struct DeviceTwin {
    id: ResourceId,
    props: Vec<PropState>,
    state: Option<DeviceState>,
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A telemetry record a property's value cannot be taken from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// A JSON object without the property's key.
    #[error("the record has no key {0:?}")]
    NoKey(String),
    /// Not a JSON object, where the property names a key.
    #[error("the record is not a JSON object with key {0:?}")]
    NotObject(String),
    /// Neither JSON nor UTF-8 text.
    #[error("the record is neither JSON nor UTF-8 text")]
    NotText,
}

/// The reported value in `payload`: the JSON key `field` of an object, or the whole payload
/// (an object's `value` key if it has one); strings as they are, other JSON as its text, and
/// bytes that are not JSON as UTF-8 text.
pub fn extract(payload: &[u8], field: Option<&str>) -> Result<String, RecordError> {
    let json: Option<serde_json::Value> = serde_json::from_slice(payload).ok();
    let value = match (json, field) {
        (Some(serde_json::Value::Object(mut map)), Some(field)) => map
            .remove(field)
            .ok_or_else(|| RecordError::NoKey(field.to_owned()))?,
        (_, Some(field)) => return Err(RecordError::NotObject(field.to_owned())),
        (Some(serde_json::Value::Object(mut map)), None) if map.contains_key("value") => {
            map.remove("value").unwrap_or_default()
        }
        (Some(v), None) => v,
        (None, None) => {
            return String::from_utf8(payload.to_vec())
                .map(|s| s.trim().to_owned())
                .map_err(|_| RecordError::NotText);
        }
    };
    Ok(match value {
        serde_json::Value::String(s) => s,
        other => other.to_string(),
    })
}

impl DeviceTwin {
    /// A new twin for `plan`: nothing delivered, nothing reported; first collect and report
    /// one cycle from `now`, desired values at once.
    pub fn new(plan: &DevicePlan, now: Instant) -> Self {
        let mut twin = Self {
            id: plan.id.clone(),
            props: Vec::new(),
            state: None,
        };
        twin.update(plan, now);
        twin
    }

    /// Takes a new plan (UpdateDevice): properties keep their reported values and delivered
    /// desired values by name; a changed desired value is delivered again.
    pub fn update(&mut self, plan: &DevicePlan, now: Instant) {
        let mut old: HashMap<String, PropState> = self
            .props
            .drain(..)
            .map(|p| (p.plan.name.clone(), p))
            .collect();
        self.props = plan
            .properties
            .iter()
            .map(|p| match old.remove(&p.name) {
                Some(mut s) => {
                    s.plan = p.clone();
                    s.retry_at = None;
                    s
                }
                None => PropState {
                    plan: p.clone(),
                    delivered: None,
                    retry_at: None,
                    reported: None,
                    queued: None,
                    next_report: now + p.report_cycle,
                    next_collect: now + p.collect_cycle,
                    last_error: None,
                },
            })
            .collect();
    }

    /// The device.
    pub fn id(&self) -> &ResourceId {
        &self.id
    }

    /// Set commands for desired values not yet delivered (and not waiting for a retry).
    pub fn pending_desired(&self, now: Instant) -> Vec<Command> {
        self.props
            .iter()
            .filter(|p| p.retry_at.is_none_or(|t| t <= now))
            .filter_map(|p| {
                let desired = p.plan.desired.as_ref()?;
                (p.delivered.as_ref() != Some(desired)).then(|| Command {
                    property: p.plan.name.clone(),
                    name: p.plan.set_command.clone(),
                    payload: desired.clone().into_bytes(),
                    delivers: Some(desired.clone()),
                })
            })
            .collect()
    }

    /// Get commands due at `now`; each is scheduled again a collect cycle later.
    pub fn due_collects(&mut self, now: Instant) -> Vec<Command> {
        let mut out = Vec::new();
        for p in &mut self.props {
            if p.next_collect > now {
                continue;
            }
            p.next_collect = now + p.plan.collect_cycle;
            if let Some(get) = &p.plan.get_command {
                out.push(Command {
                    property: p.plan.name.clone(),
                    name: get.clone(),
                    payload: Vec::new(),
                    delivers: None,
                });
            }
        }
        out
    }

    fn prop(&mut self, name: &str) -> Option<&mut PropState> {
        self.props.iter_mut().find(|p| p.plan.name == name)
    }

    /// The function answered `command`: a set command's value counts as delivered, and a reply
    /// payload is the property's reported value.
    pub fn on_reply(&mut self, command: &Command, reply: Option<&[u8]>) {
        let Some(p) = self.prop(&command.property) else {
            return;
        };
        if let Some(value) = &command.delivers {
            p.delivered = Some(value.clone());
            p.retry_at = None;
        }
        if let Some(bytes) = reply.filter(|b| !b.is_empty()) {
            Self::set_reported(p, bytes);
        }
    }

    /// `command` failed: a set command is tried again one report cycle after `now`.
    pub fn on_failure(&mut self, command: &Command, error: String, now: Instant) {
        if let Some(p) = self.prop(&command.property) {
            if command.delivers.is_some() {
                p.retry_at = Some(now + p.plan.report_cycle);
            }
            p.last_error = Some(format!("{}: {error}", command.name));
        }
    }

    /// A telemetry record of the device's function: every property on that stream takes its
    /// value.
    pub fn on_telemetry(&mut self, stream: &str, payload: &[u8]) {
        for p in self.props.iter_mut().filter(|p| p.plan.stream == stream) {
            Self::set_reported(p, payload);
        }
    }

    fn set_reported(p: &mut PropState, payload: &[u8]) {
        // The reason is words in the twin's status (`last_error`), either cause alike.
        let taken = extract(payload, p.plan.field.as_deref())
            .map_err(|e| e.to_string())
            .and_then(|v| {
                p.plan.model.check_value(&v).map_err(|e| e.to_string())?;
                Ok(v)
            });
        match taken {
            Ok(value) => {
                p.reported = Some((value, wall_ms()));
                p.last_error = None;
            }
            Err(e) => p.last_error = Some(format!("reported value not taken: {e}")),
        }
    }

    /// The twin report due at `now`, if any property due then has a changed value; the
    /// reported properties count as queued.
    pub fn due_report(&mut self, now: Instant) -> Option<Report> {
        let mut twins = Vec::new();
        for p in &mut self.props {
            if p.next_report > now {
                continue;
            }
            p.next_report = now + p.plan.report_cycle;
            let Some((value, at_ms)) = &p.reported else {
                continue;
            };
            if !p.plan.report_to_cloud || p.queued.as_ref() == Some(value) {
                continue;
            }
            p.queued = Some(value.clone());
            twins.push(twin(&p.plan, Some((value.as_str(), *at_ms))));
        }
        (!twins.is_empty()).then(|| {
            Report::Twins(pb::ReportDeviceStatusRequest {
                device_name: self.id.name.clone(),
                device_namespace: self.id.namespace.clone(),
                reported_device: Some(pb::DeviceStatus {
                    twins,
                    report_to_cloud: true,
                    report_cycle: 0,
                }),
            })
        })
    }

    /// The function's health now; a state report if the device's state changed.
    pub fn on_health(&mut self, health: Option<&Health>) -> Option<Report> {
        let state = DeviceState::of(health);
        if self.state == Some(state) {
            return None;
        }
        self.state = Some(state);
        Some(Report::State(pb::ReportDeviceStatesRequest {
            device_name: self.id.name.clone(),
            device_namespace: self.id.namespace.clone(),
            state: state.as_str().to_owned(),
        }))
    }

    /// The earliest moment something is due (a report, a collect or a desired retry).
    pub fn next_deadline(&self, now: Instant) -> Instant {
        let far = now + Duration::from_secs(3600);
        self.props
            .iter()
            .flat_map(|p| {
                let retry = p
                    .plan
                    .desired
                    .as_ref()
                    .filter(|d| p.delivered.as_ref() != Some(*d))
                    .map(|_| p.retry_at.unwrap_or(now));
                [Some(p.next_report), Some(p.next_collect), retry]
            })
            .flatten()
            .min()
            .unwrap_or(far)
            .min(far)
    }

    /// The twins as `GetDevice` answers them: observed desired and reported values.
    pub fn status(&self) -> pb::DeviceStatus {
        pb::DeviceStatus {
            twins: self
                .props
                .iter()
                .map(|p| twin(&p.plan, p.reported.as_ref().map(|(v, t)| (v.as_str(), *t))))
                .collect(),
            report_to_cloud: true,
            report_cycle: 0,
        }
    }

    /// The device's state as last seen.
    pub fn state(&self) -> Option<DeviceState> {
        self.state
    }

    /// Last error of each property that has one.
    pub fn errors(&self) -> Vec<(String, String)> {
        self.props
            .iter()
            .filter_map(|p| Some((p.plan.name.clone(), p.last_error.clone()?)))
            .collect()
    }
}

fn twin(plan: &PropertyPlan, reported: Option<(&str, u64)>) -> pb::Twin {
    let meta = |at: Option<u64>| {
        let mut m = std::collections::HashMap::from([(
            "type".to_owned(),
            plan.model.value_type.as_str().to_owned(),
        )]);
        if let Some(at) = at {
            m.insert("timestamp".to_owned(), at.to_string());
        }
        m
    };
    pb::Twin {
        property_name: plan.name.clone(),
        observed_desired: plan.desired.as_ref().map(|v| pb::TwinProperty {
            value: v.clone(),
            metadata: meta(None),
        }),
        reported: reported.map(|(v, at)| pb::TwinProperty {
            value: v.to_owned(),
            metadata: meta(Some(at)),
        }),
    }
}

#[cfg(test)]
#[path = "twin_tests.rs"]
mod tests;
