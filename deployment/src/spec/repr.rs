//! The stored form of a [`WorkloadSpec`]: the flat JSON object the agent stores, compares and
//! hashes, with `kind` (left out for `wasm`) beside the optional `module`, `container`,
//! `microvm`, `args` and `env` parts.
//!
//! That form predates [`Artifact`]; it is kept byte for byte so that specs stored by older
//! agents still compare equal to the same spec parsed today. Writing goes through a borrowed
//! mirror ([`WorkloadRef`]); reading goes through [`WorkloadRepr`] and refuses a form whose
//! parts do not fit its kind.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize, Serializer};

use super::{
    Artifact, ContainerWorkload, GpioGrantSpec, I2cGrantSpec, IsolationChoice, Limits,
    MicrovmWorkload, ModuleRef, RestartPolicy, SpiGrantSpec, Tier, Trigger, WasmArtifact,
    WorkloadSpec,
};

/// The flat stored form, as read.
#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(super) struct WorkloadRepr {
    name: String,
    #[serde(default)]
    kind: Tier,
    #[serde(default)]
    isolation: Option<IsolationChoice>,
    #[serde(default)]
    module: Option<ModuleRef>,
    #[serde(default)]
    container: Option<ContainerWorkload>,
    #[serde(default)]
    microvm: Option<MicrovmWorkload>,
    #[serde(default)]
    config: BTreeMap<String, String>,
    #[serde(default)]
    triggers: Vec<Trigger>,
    #[serde(default)]
    limits: Limits,
    #[serde(default)]
    restart: RestartPolicy,
    #[serde(default)]
    gpio: Vec<GpioGrantSpec>,
    #[serde(default)]
    spi: Vec<SpiGrantSpec>,
    #[serde(default)]
    i2c: Vec<I2cGrantSpec>,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
}

/// The flat stored form, as written: the fields in the order (and with the omissions) of the
/// form before [`Artifact`].
#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct WorkloadRef<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Tier::is_wasm")]
    kind: Tier,
    #[serde(skip_serializing_if = "Option::is_none")]
    isolation: Option<IsolationChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    module: Option<&'a ModuleRef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    container: Option<&'a ContainerWorkload>,
    #[serde(skip_serializing_if = "Option::is_none")]
    microvm: Option<&'a MicrovmWorkload>,
    config: &'a BTreeMap<String, String>,
    triggers: &'a [Trigger],
    limits: &'a Limits,
    restart: RestartPolicy,
    #[serde(skip_serializing_if = "is_empty")]
    gpio: &'a [GpioGrantSpec],
    #[serde(skip_serializing_if = "is_empty")]
    spi: &'a [SpiGrantSpec],
    #[serde(skip_serializing_if = "is_empty")]
    i2c: &'a [I2cGrantSpec],
    #[serde(skip_serializing_if = "is_empty")]
    args: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    env: Option<&'a BTreeMap<String, String>>,
}

fn is_empty<T>(list: &&[T]) -> bool {
    list.is_empty()
}

impl Serialize for WorkloadSpec {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let (module, container, microvm, args, env) = match &self.artifact {
            Artifact::Wasm(wasm) => (
                Some(&wasm.module),
                None,
                None,
                wasm.args.as_slice(),
                (!wasm.env.is_empty()).then_some(&wasm.env),
            ),
            Artifact::Container(container) => (None, Some(container), None, &[][..], None),
            Artifact::Microvm(vm) => (None, None, Some(vm), &[][..], None),
        };
        WorkloadRef {
            name: &self.name,
            kind: self.kind(),
            isolation: self.isolation,
            module,
            container,
            microvm,
            config: &self.config,
            triggers: &self.triggers,
            limits: &self.limits,
            restart: self.restart,
            gpio: &self.gpio,
            spi: &self.spi,
            i2c: &self.i2c,
            args,
            env,
        }
        .serialize(serializer)
    }
}

/// Why a stored form is not a workload: a part of another kind, or the kind's own part missing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReprError {
    /// A part that only another kind has, such as `container` on a `wasm` workload.
    #[error("`{field}` applies to {owner} workloads only; this workload is {kind}")]
    Foreign {
        /// The part at fault.
        field: &'static str,
        /// The kind that has it.
        owner: Tier,
        /// The workload's kind.
        kind: Tier,
    },
    /// The part the kind needs, such as `module` of a `wasm` workload.
    #[error("missing field `{field}` of a {kind} workload")]
    Missing {
        /// The missing part.
        field: &'static str,
        /// The workload's kind.
        kind: Tier,
    },
}

impl TryFrom<WorkloadRepr> for WorkloadSpec {
    type Error = ReprError;

    fn try_from(repr: WorkloadRepr) -> Result<Self, ReprError> {
        let kind = repr.kind;
        let foreign = [
            ("module", repr.module.is_some(), Tier::Wasm),
            ("args", !repr.args.is_empty(), Tier::Wasm),
            ("env", !repr.env.is_empty(), Tier::Wasm),
            ("container", repr.container.is_some(), Tier::Container),
            ("microvm", repr.microvm.is_some(), Tier::Microvm),
        ];
        if let Some(&(field, _, owner)) = foreign
            .iter()
            .find(|(_, present, owner)| *present && *owner != kind)
        {
            return Err(ReprError::Foreign { field, owner, kind });
        }
        let missing = |field| ReprError::Missing { field, kind };
        let artifact = match kind {
            Tier::Wasm => Artifact::Wasm(WasmArtifact {
                module: repr.module.ok_or_else(|| missing("module"))?,
                args: repr.args,
                env: repr.env,
            }),
            Tier::Container => {
                Artifact::Container(repr.container.ok_or_else(|| missing("container"))?)
            }
            Tier::Microvm => Artifact::Microvm(repr.microvm.ok_or_else(|| missing("microvm"))?),
        };
        Ok(WorkloadSpec {
            name: repr.name,
            isolation: repr.isolation,
            artifact,
            config: repr.config,
            triggers: repr.triggers,
            limits: repr.limits,
            restart: repr.restart,
            gpio: repr.gpio,
            spi: repr.spi,
            i2c: repr.i2c,
        })
    }
}
