//! The generator of deployment documents for the deployment targets: keys from the schema,
//! values at every edge (limits, grants, triggers, names), a hostile value about one in ten.

use arbitrary::Unstructured;

use crate::input::{self, Doc, int, one_in, pick};

/// How often a value is hostile: never in a clean document (one in four: they reach the
/// acceptance properties), else about one value in ten (most documents then have one or two
/// faults, so validation goes deep before it meets one).
struct Gen {
    rate: u8,
}

impl Gen {
    fn bad(&self, u: &mut Unstructured<'_>) -> bool {
        self.rate > 0 && one_in(u, self.rate)
    }

    /// A valid value from `good`, or a hostile one from `hostile`.
    fn value(
        &self,
        u: &mut Unstructured<'_>,
        good: impl FnOnce(&mut Unstructured<'_>) -> Doc,
        hostile: impl FnOnce(&mut Unstructured<'_>) -> Doc,
    ) -> Doc {
        if self.bad(u) { hostile(u) } else { good(u) }
    }

    fn string(
        &self,
        u: &mut Unstructured<'_>,
        good: impl FnOnce(&mut Unstructured<'_>) -> String,
        hostile: impl FnOnce(&mut Unstructured<'_>) -> String,
    ) -> Doc {
        self.value(u, |u| Doc::Str(good(u)), |u| Doc::Str(hostile(u)))
    }

    fn duration(&self, u: &mut Unstructured<'_>) -> Doc {
        self.string(
            u,
            |u| {
                if one_in(u, 2) {
                    format!("{}ms", int(u, 1..=10_000))
                } else {
                    format!("{}s", int(u, 1..=120))
                }
            },
            input::duration,
        )
    }

    fn size(&self, u: &mut Unstructured<'_>, min_kib: u64) -> Doc {
        self.string(
            u,
            |u| {
                if one_in(u, 2) {
                    format!("{}MiB", int(u, min_kib.div_ceil(1024).max(1)..=256))
                } else {
                    format!("{}KiB", int(u, min_kib..=min_kib * 16))
                }
            },
            input::size,
        )
    }

    fn count(&self, u: &mut Unstructured<'_>, range: std::ops::RangeInclusive<u64>) -> Doc {
        self.value(
            u,
            |u| Doc::Int(i64::try_from(int(u, range)).unwrap_or(i64::MAX)),
            |u| Doc::Int(input::number(u)),
        )
    }

    fn pick(&self, u: &mut Unstructured<'_>, good: &[&str], hostile: &[&str]) -> Doc {
        self.string(
            u,
            |u| pick(u, good).to_owned(),
            |u| {
                if one_in(u, 2) {
                    input::name(u)
                } else {
                    pick(u, hostile).to_owned()
                }
            },
        )
    }
}

/// A deployment document: the schema's keys, hostile values, sometimes a stray key.
pub fn document(u: &mut Unstructured<'_>) -> Doc {
    let g = Gen {
        rate: if one_in(u, 4) { 0 } else { 10 },
    };
    let mut top = Vec::new();
    if one_in(u, 4) {
        top.push((
            "description".to_owned(),
            g.string(u, |_| "demo".into(), input::name),
        ));
    }
    if g.rate == 0 || !one_in(u, 40) {
        let n = int(u, 0..=4);
        let workloads = (0..n).map(|i| workload(u, &g, i)).collect();
        top.push(("workloads".to_owned(), Doc::Arr(workloads)));
    }
    if g.bad(u) && one_in(u, 3) {
        top.push((input::name(u), input::any_value(u, 0)));
    }
    Doc::Table(top)
}

const KINDS: &[&str] = &["wasm", "container", "microvm"];

fn workload(u: &mut Unstructured<'_>, g: &Gen, index: u64) -> Doc {
    let kind = pick(u, KINDS);
    let mut fields: Vec<(String, Doc)> = vec![(
        "name".into(),
        g.string(u, |_| format!("w-{index}"), input::name),
    )];
    if kind != "wasm" || one_in(u, 4) {
        fields.push(("kind".into(), g.pick(u, &[kind], &["vm", "Wasm", ""])));
    }
    let mut add = |key: &str, value: Doc| fields.push((key.to_owned(), value));
    match kind {
        "wasm" => {
            let module = g.string(
                u,
                |u| {
                    if one_in(u, 2) {
                        let hex: String = (0..64).map(|_| pick(u, &['0', '7', 'a', 'f'])).collect();
                        format!("sha256:{hex}")
                    } else {
                        "counter.wasm".into()
                    }
                },
                |u| {
                    if one_in(u, 2) {
                        input::digest_ref(u)
                    } else {
                        input::path(u)
                    }
                },
            );
            add("module", module);
        }
        "container" => {
            let key = if one_in(u, 2) { "image" } else { "rootfs" };
            add(key, g.string(u, |_| "hello-oci".into(), input::path));
            if g.bad(u) {
                add("rootfs", Doc::Str(input::path(u)));
            }
            if key == "rootfs" || one_in(u, 2) {
                let n = if key == "rootfs" {
                    int(u, 1..=3)
                } else {
                    int(u, 0..=3)
                };
                add(
                    "command",
                    Doc::Arr(
                        (0..n)
                            .map(|_| g.string(u, |_| "/bin/sh".into(), input::path))
                            .collect(),
                    ),
                );
            }
            if one_in(u, 2) {
                let n = int(u, 0..=3);
                add(
                    "args",
                    Doc::Arr(
                        (0..n)
                            .map(|_| g.string(u, |_| "-c".into(), input::path))
                            .collect(),
                    ),
                );
            }
            if one_in(u, 3) {
                let n = int(u, 0..=3);
                add(
                    "env",
                    Doc::Table(
                        (0..n)
                            .map(|i| {
                                let key = if g.bad(u) {
                                    input::name(u)
                                } else {
                                    format!("VAR_{i}")
                                };
                                (key, g.string(u, |_| "value".into(), input::name))
                            })
                            .collect(),
                    ),
                );
            }
        }
        _ => {
            add("kernel", g.string(u, |_| "vmlinuz".into(), input::path));
            let key = if one_in(u, 2) { "initramfs" } else { "disk" };
            add(key, g.string(u, |_| "root.img".into(), input::path));
            if g.bad(u) {
                add("disk", Doc::Str(input::path(u)));
            }
            if one_in(u, 2) {
                add("vcpus", g.count(u, 1..=4));
            }
            if one_in(u, 3) {
                add("cmdline", g.string(u, |_| "quiet".into(), input::name));
            }
            if one_in(u, 3) {
                add("ready-marker", g.string(u, |_| "READY".into(), input::name));
            }
            if one_in(u, 2) {
                add("boot-timeout", g.duration(u));
            }
        }
    }
    if one_in(u, 3) {
        let choices: &[&str] = match kind {
            "wasm" => &["wasm", "strongest"],
            "container" => &["container", "strongest"],
            _ => &["microvm", "strongest"],
        };
        add(
            "isolation",
            g.pick(u, choices, &["weakest", "wasm", "container", "microvm"]),
        );
    }
    if one_in(u, 3) {
        add(
            "restart",
            g.pick(u, &["always", "on-failure", "never"], &["sometimes", ""]),
        );
    }
    if one_in(u, 2) {
        add("limits", limits(u, g, kind));
    }
    let inputs: Vec<&str>;
    if kind != "microvm" && one_in(u, 2) {
        let (grants, names) = gpio_grants(u, g);
        inputs = names;
        add("gpio", grants);
    } else {
        inputs = Vec::new();
    }
    if kind == "wasm" {
        if one_in(u, 2) {
            // At most one interval, and one edge trigger per input (unless hostile).
            let mut triggers = Vec::new();
            if one_in(u, 2) || g.bad(u) {
                triggers.push(Doc::Table(vec![("interval".into(), g.duration(u))]));
            }
            for name in &inputs {
                if one_in(u, 2) {
                    triggers.push(edge_trigger(u, g, name));
                }
            }
            if g.bad(u) {
                triggers.push(Doc::Table(vec![("interval".into(), g.duration(u))]));
            }
            add("triggers", Doc::Arr(triggers));
        }
        if one_in(u, 3) {
            let n = int(u, 0..=3);
            add(
                "config",
                Doc::Table(
                    (0..n)
                        .map(|i| {
                            let key = if g.bad(u) {
                                input::name(u)
                            } else {
                                format!("key{i}")
                            };
                            let value = g.value(
                                u,
                                |u| {
                                    if one_in(u, 2) {
                                        Doc::Str(input::name(u))
                                    } else {
                                        Doc::Int(int::<i64>(u, 0..=100))
                                    }
                                },
                                |u| input::any_value(u, 2),
                            );
                            (key, value)
                        })
                        .collect(),
                ),
            );
        }
        if one_in(u, 3) {
            add("spi", spi_grants(u, g));
        }
        if one_in(u, 3) {
            add("i2c", i2c_grants(u, g));
        }
    }
    if g.bad(u) && one_in(u, 3) {
        // A field of another kind, or a misspelt one: both must be refused by name.
        let key = pick(
            u,
            &[
                "module",
                "image",
                "kernel",
                "triggers",
                "cpus",
                "vcpus",
                "modul",
                "limit",
                "time_slice",
                "spi",
            ],
        );
        let value = input::any_value(u, 1);
        add(key, value);
    }
    if g.bad(u) && one_in(u, 6) {
        // The same key twice.
        let again = fields[0].clone();
        fields.push(again);
    }
    Doc::Table(fields)
}

fn limits(u: &mut Unstructured<'_>, g: &Gen, kind: &str) -> Doc {
    let mut fields = Vec::new();
    let all = g.bad(u) && one_in(u, 3);
    if one_in(u, 2) {
        let min_kib = if kind == "microvm" { 32 * 1024 } else { 64 };
        let memory = g.value(u, |u| g.size(u, min_kib), |u| Doc::Int(input::number(u)));
        fields.push(("memory".to_owned(), memory));
    }
    if kind == "wasm" || all {
        if one_in(u, 2) {
            fields.push(("time-slice".to_owned(), g.duration(u)));
        }
        if one_in(u, 2) {
            fields.push(("queue".to_owned(), g.count(u, 1..=1024)));
        }
    }
    if kind == "container" || all {
        if one_in(u, 2) {
            let cpus = g.value(
                u,
                |u| Doc::Float(pick(u, &[0.5, 0.01, 1.0, 2.0, 0.25])),
                |u| {
                    Doc::Float(pick(
                        u,
                        &[
                            0.001,
                            0.0,
                            64.0,
                            4294967.296,
                            1e9,
                            -1.0,
                            f64::NAN,
                            f64::INFINITY,
                        ],
                    ))
                },
            );
            fields.push(("cpus".to_owned(), cpus));
        }
        if one_in(u, 2) {
            fields.push(("pids".to_owned(), g.count(u, 1..=1000)));
        }
    }
    Doc::Table(fields)
}

const PINS: &[&str] = &["GPIO17", "GPIO27", "GPIO22", "GPIO23"];
const GPIO_NAMES: &[&str] = &["led", "button", "door", "relay"];

/// GPIO grants and the names of the inputs among them.
fn gpio_grants(u: &mut Unstructured<'_>, g: &Gen) -> (Doc, Vec<&'static str>) {
    let n = int::<usize>(u, 0..=3);
    let mut inputs = Vec::new();
    let grants = (0..n)
        .map(|i| {
            let input = one_in(u, 2);
            let name = GPIO_NAMES[i];
            if input {
                inputs.push(name);
            }
            let mut grant = vec![
                ("name".into(), g.string(u, |_| name.into(), input::name)),
                ("pin".into(), g.string(u, |_| PINS[i].into(), input::pin)),
                (
                    "mode".into(),
                    g.pick(
                        u,
                        &[if input { "input" } else { "output" }],
                        &["both", "in"],
                    ),
                ),
            ];
            if !input && one_in(u, 2) {
                grant.push(("initial".into(), g.pick(u, &["low", "high"], &["floating"])));
            }
            if input {
                if one_in(u, 2) {
                    grant.push((
                        "bias".into(),
                        g.pick(u, &["disabled", "pull-up", "pull-down"], &["up"]),
                    ));
                }
                if one_in(u, 2) {
                    grant.push((
                        "edge".into(),
                        g.pick(u, &["rising", "falling", "both"], &["none"]),
                    ));
                }
                if one_in(u, 2) {
                    grant.push(("debounce".into(), g.duration(u)));
                }
            } else if g.bad(u) {
                grant.push(("debounce".into(), Doc::Str(input::duration(u))));
            }
            Doc::Table(grant)
        })
        .collect();
    (Doc::Arr(grants), inputs)
}

fn edge_trigger(u: &mut Unstructured<'_>, g: &Gen, input: &str) -> Doc {
    let mut t = vec![(
        "gpio-edge".into(),
        g.string(u, |_| input.to_owned(), input::name),
    )];
    if one_in(u, 2) {
        t.push((
            "edge".into(),
            g.pick(u, &["rising", "falling", "both"], &["none"]),
        ));
    }
    if one_in(u, 2) {
        t.push(("debounce".into(), g.duration(u)));
    }
    Doc::Table(t)
}

fn spi_grants(u: &mut Unstructured<'_>, g: &Gen) -> Doc {
    let n = int(u, 0..=1);
    Doc::Arr(
        (0..n)
            .map(|_| {
                let mut grant = vec![
                    ("name".into(), g.string(u, |_| "adc".into(), input::name)),
                    ("bus".into(), g.string(u, |_| "spi0.0".into(), input::bus)),
                ];
                if one_in(u, 2) {
                    grant.push(("max-hz".into(), g.count(u, 1..=3_600_000)));
                }
                Doc::Table(grant)
            })
            .collect(),
    )
}

fn i2c_grants(u: &mut Unstructured<'_>, g: &Gen) -> Doc {
    let n = int(u, 0..=1);
    Doc::Arr(
        (0..n)
            .map(|_| {
                let count = int(u, 0..=2);
                let addresses = (0..count)
                    .map(|i| {
                        g.value(
                            u,
                            |_| Doc::Int([0x48, 0x76][i]),
                            |u| Doc::Int(pick(u, &[0x00, 0x77, 0x78, 0x7f, 0x80, 0x3ff, -1])),
                        )
                    })
                    .collect();
                Doc::Table(vec![
                    ("name".into(), g.string(u, |_| "env".into(), input::name)),
                    ("bus".into(), g.string(u, |_| "i2c-1".into(), input::bus)),
                    ("addresses".into(), Doc::Arr(addresses)),
                ])
            })
            .collect(),
    )
}
