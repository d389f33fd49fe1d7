//! A DeviceModel checked into a [`Model`]: its properties with their types, access and range.

use std::collections::BTreeMap;

use super::{MAX_PROPERTIES, MAX_VALUE, ResourceId, check_name};
use crate::error::DmiError;
use crate::proto::v1beta1 as pb;

/// The type of a property's values, from the model (`int`, `float`, `double`, `boolean`,
/// `string`, `bytes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueType {
    /// A 64-bit integer.
    Int,
    /// A float (`float` or `double`).
    Float,
    /// `true` or `false`.
    Boolean,
    /// Any text.
    String,
    /// Any text (base64 by convention).
    Bytes,
}

impl ValueType {
    fn parse(text: &str) -> Option<Self> {
        Some(match text.to_ascii_lowercase().as_str() {
            "int" | "integer" => ValueType::Int,
            "float" | "double" => ValueType::Float,
            "boolean" | "bool" => ValueType::Boolean,
            "string" | "" => ValueType::String,
            "bytes" | "stream" => ValueType::Bytes,
            _ => return None,
        })
    }

    /// The name KubeEdge uses, for twin metadata.
    pub fn as_str(self) -> &'static str {
        match self {
            ValueType::Int => "int",
            ValueType::Float => "float",
            ValueType::Boolean => "boolean",
            ValueType::String => "string",
            ValueType::Bytes => "bytes",
        }
    }
}

/// One property of a model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelProperty {
    /// Value type.
    pub value_type: ValueType,
    /// Whether a desired value may be written (`ReadWrite`); `ReadOnly` properties are reported
    /// only.
    pub writable: bool,
    /// Smallest value (numbers).
    pub minimum: Option<f64>,
    /// Largest value (numbers).
    pub maximum: Option<f64>,
}

/// A property value that does not fit its model; the text says why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ValueError {
    /// Longer than the bound.
    #[error("value has {0} bytes; at most {MAX_VALUE}")]
    TooLong(usize),
    /// Not of the property's type (`int`, `float`, `true or false`).
    #[error("{value:?} is not {wanted}")]
    NotOfType {
        /// The value.
        value: String,
        /// What it should be.
        wanted: &'static str,
    },
    /// Below the property's minimum.
    #[error("{value} is below the minimum {min}")]
    Below {
        /// The value.
        value: String,
        /// The minimum.
        min: f64,
    },
    /// Above the property's maximum.
    #[error("{value} is above the maximum {max}")]
    Above {
        /// The value.
        value: String,
        /// The maximum.
        max: f64,
    },
}

impl ModelProperty {
    /// Checks `value` against the type and range; the error says why it does not fit.
    pub fn check_value(&self, value: &str) -> Result<(), ValueError> {
        if value.len() > MAX_VALUE {
            return Err(ValueError::TooLong(value.len()));
        }
        let not = |wanted| ValueError::NotOfType {
            value: value.to_owned(),
            wanted,
        };
        let number = match self.value_type {
            ValueType::Int => Some(value.parse::<i64>().map_err(|_| not("an int"))? as f64),
            ValueType::Float => Some(
                value
                    .parse::<f64>()
                    .ok()
                    .filter(|f| f.is_finite())
                    .ok_or_else(|| not("a float"))?,
            ),
            ValueType::Boolean if value == "true" || value == "false" => None,
            ValueType::Boolean => return Err(not("true or false")),
            ValueType::String | ValueType::Bytes => None,
        };
        if let Some(n) = number {
            if let Some(min) = self.minimum.filter(|min| n < *min) {
                return Err(ValueError::Below {
                    value: value.to_owned(),
                    min,
                });
            }
            if let Some(max) = self.maximum.filter(|max| n > *max) {
                return Err(ValueError::Above {
                    value: value.to_owned(),
                    max,
                });
            }
        }
        Ok(())
    }
}

/// A checked DeviceModel.
#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    /// Namespace and name.
    pub id: ResourceId,
    /// Properties by name.
    pub properties: BTreeMap<String, ModelProperty>,
}

/// Checks a DeviceModel; fields are named from the request (`model.spec.properties[0].type`).
pub fn plan_model(model: &pb::DeviceModel) -> Result<Model, DmiError> {
    let id = ResourceId::new(&model.namespace, &model.name);
    id.check("model.name", "model.namespace")?;
    let empty = Vec::new();
    let props = model.spec.as_ref().map_or(&empty, |s| &s.properties);
    if props.len() > MAX_PROPERTIES {
        return Err(DmiError::invalid(
            "model.spec.properties",
            format!("{} properties; at most {MAX_PROPERTIES}", props.len()),
        ));
    }
    let mut properties = BTreeMap::new();
    for (i, p) in props.iter().enumerate() {
        let at = format!("model.spec.properties[{i}]");
        check_name(&format!("{at}.name"), &p.name)?;
        let value_type = ValueType::parse(&p.r#type).ok_or_else(|| {
            DmiError::invalid(
                format!("{at}.type"),
                format!(
                    "type {:?} is not one of int, float, double, boolean, string, bytes, stream",
                    p.r#type
                ),
            )
        })?;
        let writable = match p.access_mode.as_str() {
            "ReadWrite" => true,
            "ReadOnly" | "" => false,
            other => {
                return Err(DmiError::invalid(
                    format!("{at}.accessMode"),
                    format!("access mode {other:?} is not ReadWrite or ReadOnly"),
                ));
            }
        };
        let bound = |field: &str, text: &str| -> Result<Option<f64>, DmiError> {
            if text.is_empty() {
                return Ok(None);
            }
            text.parse::<f64>().map(Some).map_err(|_| {
                DmiError::invalid(format!("{at}.{field}"), format!("{text:?} is not a number"))
            })
        };
        let property = ModelProperty {
            value_type,
            writable,
            minimum: bound("minimum", &p.minimum)?,
            maximum: bound("maximum", &p.maximum)?,
        };
        if properties.insert(p.name.clone(), property).is_some() {
            return Err(DmiError::invalid(
                format!("{at}.name"),
                format!("property {:?} is listed twice", p.name),
            ));
        }
    }
    Ok(Model { id, properties })
}
