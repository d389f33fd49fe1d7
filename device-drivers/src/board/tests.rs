use super::*;

#[test]
fn every_builtin_profile_loads_and_validates() {
    let all = builtin_profiles().expect("built-in profiles are valid");
    let names: Vec<_> = all.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, builtin_names(), "file name and `name` agree");
    for p in &all {
        assert!(p.supports(Isolation::Wasm), "{}", p.name);
    }
}

#[test]
fn pi_headers_map_physical_pins_to_kernel_line_labels() {
    for name in ["rpi5", "rpi4b", "rpi3bplus", "rpi-zero-2w"] {
        let p = BoardProfile::builtin(name).expect("valid");
        let pin = p.pin_by_physical(11).expect("pin 11");
        assert_eq!(pin.name, "GPIO17", "{name}");
        assert_eq!(pin.line, LineSpec::Label("GPIO17".into()), "{name}");
        assert_eq!(p.pins.len(), 28, "{name}: GPIO0..GPIO27 on the header");
        assert_eq!(
            p.pin("GPIO0").map(|p| &p.line),
            Some(&LineSpec::Label("ID_SDA".into())),
            "{name}"
        );
        assert_eq!(
            p.i2c_bus("i2c-1").map(|b| b.device.as_str()),
            Some("/dev/i2c-1")
        );
        assert_eq!(p.arch, Arch::Aarch64);
    }
}

#[test]
fn visionfive2_has_no_microvm_tier() {
    let p = BoardProfile::builtin("visionfive2").expect("valid");
    assert_eq!(p.arch, Arch::Riscv64);
    assert!(!p.supports(Isolation::Microvm));
    assert!(p.supports(Isolation::Container));
}

#[test]
fn detect_picks_the_longest_matching_model() {
    let d = detect_from_model(Some("Raspberry Pi 5 Model B Rev 1.0")).expect("detect");
    assert_eq!((d.profile.name.as_str(), d.matched), ("rpi5", true));
    let d = detect_from_model(Some("Raspberry Pi 4 Model B Rev 1.5")).expect("detect");
    assert_eq!(d.profile.name, "rpi4b");
    let d = detect_from_model(Some("Raspberry Pi 3 Model B Plus Rev 1.3")).expect("detect");
    assert_eq!(d.profile.name, "rpi3bplus");
    let d = detect_from_model(Some("Raspberry Pi Zero 2 W Rev 1.0")).expect("detect");
    assert_eq!(d.profile.name, "rpi-zero-2w");
    let d = detect_from_model(Some("StarFive VisionFive 2 v1.3B")).expect("detect");
    assert_eq!(d.profile.name, "visionfive2");
    // A Pi 3 Model B (not B+) is not claimed by the B+ profile.
    let d = detect_from_model(Some("Raspberry Pi 3 Model B Rev 1.2")).expect("detect");
    assert_eq!((d.profile.name.as_str(), d.matched), ("sim", false));
    let d = detect_from_model(None).expect("detect");
    assert_eq!((d.profile.name.as_str(), d.matched), ("sim", false));
}

#[test]
fn detect_on_this_host_falls_back_or_matches() {
    let d = detect().expect("detect never fails on built-in profiles");
    assert!(d.matched || d.profile.name == "sim");
}

fn err(text: &str) -> String {
    BoardProfile::from_toml("test", text)
        .expect_err("invalid profile")
        .to_string()
}

const HEAD: &str = r#"
name = "t"
description = "test"
backend = "linux"
arch = "aarch64"
isolation = ["wasm"]
"#;

#[test]
fn duplicate_pin_names_are_rejected() {
    let text = format!(
        "{HEAD}pins = [{{ name = \"GPIO17\", physical = 11, line = \"GPIO17\" }}, \
         {{ name = \"GPIO17\", physical = 12, line = \"GPIO18\" }}]\n"
    );
    assert_eq!(
        err(&text),
        "board profile \"t\": pin name \"GPIO17\" appears more than once"
    );
}

#[test]
fn duplicate_physical_pins_and_lines_are_rejected() {
    let text = format!(
        "{HEAD}pins = [{{ name = \"A\", physical = 11, line = \"GPIO17\" }}, \
         {{ name = \"B\", physical = 11, line = \"GPIO18\" }}]\n"
    );
    assert_eq!(
        err(&text),
        "board profile \"t\": physical pin 11 is given to more than one pin (second: \"B\")"
    );
    let text = format!(
        "{HEAD}pins = [{{ name = \"A\", line = \"GPIO17\" }}, {{ name = \"B\", line = \"GPIO17\" }}]\n"
    );
    assert_eq!(
        err(&text),
        "board profile \"t\": line GPIO17 is behind more than one pin (second: \"B\")"
    );
}

#[test]
fn badly_named_or_mismatched_buses_are_rejected() {
    let text = format!("{HEAD}[[spi]]\nname = \"spi-0\"\ndevice = \"/dev/spidev0.0\"\n");
    assert_eq!(
        err(&text),
        "board profile \"t\": SPI bus \"spi-0\" is not named spi<bus>.<chip-select>"
    );
    let text = format!("{HEAD}[[spi]]\nname = \"spi0.1\"\ndevice = \"/dev/spidev0.0\"\n");
    assert_eq!(
        err(&text),
        "board profile \"t\": SPI bus \"spi0.1\" must use /dev/spidev0.1, not /dev/spidev0.0"
    );
    let text = format!(
        "{HEAD}[[i2c]]\nname = \"i2c-1\"\ndevice = \"/dev/i2c-1\"\n\
         [[i2c]]\nname = \"i2c-1\"\ndevice = \"/dev/i2c-1\"\n"
    );
    assert_eq!(
        err(&text),
        "board profile \"t\": bus \"i2c-1\" appears more than once"
    );
    let text = format!("{HEAD}[[i2c]]\nname = \"i2c1\"\ndevice = \"/dev/i2c-1\"\n");
    assert_eq!(
        err(&text),
        "board profile \"t\": I2C bus \"i2c1\" is not named i2c-<n>"
    );
}

#[test]
fn sim_models_must_fit_the_backend() {
    let text = format!(
        "{HEAD}[[i2c]]\nname = \"i2c-1\"\ndevice = \"/dev/i2c-1\"\n\
         sim = [{{ model = \"tmp102\", address = 0x48 }}]\n"
    );
    assert_eq!(
        err(&text),
        "board profile \"t\": I2C bus \"i2c-1\" lists simulated targets on a board that is not simulated"
    );
    let text = HEAD.replace("\"linux\"", "\"sim\"")
        + "[[i2c]]\nname = \"i2c-1\"\ndevice = \"/dev/i2c-1\"\n\
           sim = [{ model = \"tmp102\", address = 0x48 }, { model = \"tmp102\", address = 0x48 }]\n";
    assert_eq!(
        err(&text),
        "board profile \"t\": I2C bus \"i2c-1\": address 0x48 is used twice"
    );
}

#[test]
fn parse_errors_name_the_profile_and_the_field() {
    let text = format!("{HEAD}pins = [{{ name = \"A\", line = \"GPIO17\", colour = \"red\" }}]\n");
    let e = err(&text);
    assert!(
        e.starts_with("board profile \"test\": unknown field `colour`"),
        "{e}"
    );
    let e = err(&HEAD.replace("\"aarch64\"", "\"mips\""));
    assert!(
        e.starts_with("board profile \"test\": unknown variant `mips`"),
        "{e}"
    );
    let e = err(&HEAD.replace("[\"wasm\"]", "[\"container\"]"));
    assert_eq!(
        e,
        "board profile \"t\": isolation must include \"wasm\": every board runs Wasm workloads"
    );
}

#[test]
fn unknown_builtin_lists_the_known_ones() {
    let e = BoardProfile::builtin("rpi2").expect_err("no such profile");
    assert!(
        e.to_string()
            .starts_with("board profile \"rpi2\": no such built-in profile (known: sim, rpi5,")
    );
}

#[test]
fn load_reports_a_missing_file_by_path() {
    let e = BoardProfile::load(Path::new("/nonexistent/board.toml")).expect_err("missing");
    assert!(
        e.to_string()
            .starts_with("board profile \"/nonexistent/board.toml\": cannot read: "),
        "{e}"
    );
}
