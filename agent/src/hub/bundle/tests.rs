//! The bundle reader against hostile bundles: each is refused naming the member, before the
//! member is read (or, for a tar, before its data is).

use std::collections::BTreeMap;

use tar::EntryType;

use super::*;

fn index() -> BundleIndex {
    BundleIndex {
        format: FORMAT.into(),
        node: "n1".into(),
        desired: DesiredState {
            version: 3,
            deployment: "[[workloads]]\n".into(),
            artifacts: Default::default(),
            precompiled: Vec::new(),
            system: None,
            signature: Some("c2ln".into()),
            key_id: Some("00".into()),
        },
    }
}

fn index_bytes() -> Vec<u8> {
    serde_json::to_vec(&index()).unwrap()
}

fn digest(c: char) -> String {
    c.to_string().repeat(64)
}

fn expected(digests: &[&str]) -> Expected {
    digests.iter().map(|d| ((*d).to_owned(), None)).collect()
}

/// Reads every artifact of `bundle` that `expected` allows into a map.
fn collect(bundle: &Bundle, expected: &Expected) -> Result<BTreeMap<String, Vec<u8>>> {
    let mut out = BTreeMap::new();
    bundle.artifacts(expected, |name, reader, size| {
        let mut bytes = Vec::new();
        reader.read_to_end(&mut bytes)?;
        assert_eq!(u64::try_from(bytes.len()).unwrap(), size);
        out.insert(name.to_owned(), bytes);
        Ok(())
    })?;
    Ok(out)
}

fn err_text<T>(r: Result<T>) -> String {
    match r {
        Ok(_) => panic!("a hostile bundle was accepted"),
        Err(e) => format!("{e:#}"),
    }
}

/// A tar of raw headers: each member's name is written into the header as it is (so `..` and
/// absolute names can be made), with its type and data; `size` overrides the header's size.
fn raw_tar(dir: &Path, members: &[(&str, EntryType, &[u8], Option<u64>)]) -> PathBuf {
    let path = dir.join("raw.tar");
    let mut builder = tar::Builder::new(File::create(&path).unwrap());
    for (name, kind, data, size) in members {
        let mut header = tar::Header::new_gnu();
        header.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
        header.set_entry_type(*kind);
        header.set_mode(0o644);
        header.set_size(u64::try_from(data.len()).unwrap());
        if *kind == EntryType::Symlink {
            header.set_size(0);
            header.set_link_name("/etc/passwd").unwrap();
        }
        header.set_cksum();
        builder.append(&header, *data).unwrap();
        if let Some(size) = size {
            // Rewrite the size field of the header just written (a header that claims more
            // than the file holds), then its checksum.
            let mut file = builder.get_mut().try_clone().unwrap();
            use std::io::{SeekFrom, Write};
            let end = file.seek(SeekFrom::End(0)).unwrap();
            let start = end - 512 - u64::try_from(data.len().div_ceil(512) * 512).unwrap();
            header.set_size(*size);
            header.set_cksum();
            file.seek(SeekFrom::Start(start)).unwrap();
            file.write_all(header.as_bytes()).unwrap();
            file.seek(SeekFrom::End(0)).unwrap();
        }
    }
    builder.finish().unwrap();
    path
}

#[test]
fn bundles_round_trip_as_directory_and_tar() {
    let dir = tempfile::tempdir().unwrap();
    let d = digest('a');
    let arts = [(d.clone(), &b"module bytes"[..])];
    for name in ["b", "b.tar"] {
        let out = dir.path().join(name);
        write(&out, &index(), &arts).unwrap();
        let bundle = Bundle::open(&out, Limits::default()).unwrap();
        assert_eq!(bundle.index().unwrap(), index(), "{name}");
        let back = collect(&bundle, &expected(&[&d])).unwrap();
        assert_eq!(back.len(), 1);
        assert_eq!(back[&d], b"module bytes");
        // A second pass reads the same.
        assert_eq!(collect(&bundle, &expected(&[&d])).unwrap(), back);
        assert!(write(&out, &index(), &arts).is_err(), "no overwrite");
    }
}

#[test]
fn bad_bundles_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let err = err_text(Bundle::open(&dir.path().join("none"), Limits::default()));
    assert!(
        err.contains("none") && err.contains("No such file"),
        "{err}"
    );
    std::fs::write(dir.path().join("x.tar"), b"not a tar file at all").unwrap();
    let bundle = Bundle::open(&dir.path().join("x.tar"), Limits::default()).unwrap();
    assert!(bundle.index().is_err());
    let b = dir.path().join("b");
    std::fs::create_dir(&b).unwrap();
    std::fs::write(
        b.join("bundle.json"),
        br#"{"format": "other", "node": "n", "desired": {"version": 1, "deployment": ""}}"#,
    )
    .unwrap();
    let err = err_text(Bundle::open(&b, Limits::default()).unwrap().index());
    assert!(err.contains("format \"other\""), "{err}");
}

#[test]
fn the_index_is_read_alone_and_members_after_it_are_not_touched() {
    let dir = tempfile::tempdir().unwrap();
    let json = index_bytes();
    let path = raw_tar(
        dir.path(),
        &[
            ("./", EntryType::Directory, b"", None),
            ("bundle.json", EntryType::Regular, &json, None),
            ("artifacts/x", EntryType::Fifo, b"", None),
        ],
    );
    let bundle = Bundle::open(&path, Limits::default()).unwrap();
    assert_eq!(bundle.index().unwrap(), index());
    let err = err_text(collect(&bundle, &expected(&[])));
    assert!(err.contains("\"artifacts/x\""), "{err}");
}

#[test]
fn oversized_members_are_refused_by_their_size_before_they_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let small = Limits {
        index: 1000,
        artifact: 100,
    };
    let d = digest('b');
    let json = index_bytes();
    // A tar header claiming 1 TiB, with 200 bytes behind it.
    let name = format!("artifacts/{d}");
    let path = raw_tar(
        dir.path(),
        &[
            ("bundle.json", EntryType::Regular, &json, None),
            (&name, EntryType::Regular, &[7; 200], Some(1 << 40)),
        ],
    );
    let bundle = Bundle::open(&path, small).unwrap();
    bundle.index().unwrap();
    let mut visited = false;
    let err = err_text(bundle.artifacts(&expected(&[&d]), |_, _, _| {
        visited = true;
        Ok(())
    }));
    assert!(!visited);
    assert!(
        err.contains(&format!("member artifacts/{d} is 1099511627776 bytes"))
            && err.contains("bound of 100 bytes"),
        "{err}"
    );
    // A directory bundle with a sparse 1 TiB member: refused by its size, not read.
    let b = dir.path().join("b");
    write(&b, &index(), &[(d.clone(), &b"x"[..])]).unwrap();
    File::options()
        .write(true)
        .open(b.join("artifacts").join(&d))
        .unwrap()
        .set_len(1 << 40)
        .unwrap();
    let err = err_text(collect(
        &Bundle::open(&b, Limits::default()).unwrap(),
        &expected(&[&d]),
    ));
    assert!(
        err.contains(&format!("member artifacts/{d} is 1099511627776 bytes"))
            && err.contains(&format!("bound of {MAX_ARTIFACT} bytes")),
        "{err}"
    );
    // A size the signed desired state gives is the size the member must have.
    let signed: Expected = [(d.clone(), Some(1))].into();
    let err = err_text(collect(
        &Bundle::open(&b, Limits::default()).unwrap(),
        &signed,
    ));
    assert!(
        err.contains(&format!(
            "member artifacts/{d} is 1099511627776 bytes; the signed desired state says 1"
        )),
        "{err}"
    );
    std::fs::write(b.join("artifacts").join(&d), b"x").unwrap();
    let back = collect(&Bundle::open(&b, Limits::default()).unwrap(), &signed).unwrap();
    assert_eq!(back[&d], b"x");
    // An index of many MB, in both forms.
    let big = vec![b' '; 5 << 20];
    std::fs::write(b.join("bundle.json"), &big).unwrap();
    let err = err_text(Bundle::open(&b, Limits::default()).unwrap().index());
    assert!(
        err.contains("member bundle.json is 5242880 bytes, more than the bound of 1048576 bytes"),
        "{err}"
    );
    let path = dir.path().join("big");
    std::fs::create_dir(&path).unwrap();
    let path = raw_tar(&path, &[("bundle.json", EntryType::Regular, &big, None)]);
    let err = err_text(Bundle::open(&path, Limits::default()).unwrap().index());
    assert!(err.contains("member bundle.json is 5242880 bytes"), "{err}");
}

#[test]
fn fifos_devices_and_symlinks_are_refused_without_being_opened() {
    use rustix::fs::{FileType, Mode, mknodat};
    let dir = tempfile::tempdir().unwrap();
    let d = digest('c');
    let b = dir.path().join("b");
    write(&b, &index(), &[(d.clone(), &b"x"[..])]).unwrap();
    let arts = b.join("artifacts");
    let member = arts.join(&d);

    // A FIFO member: opening it for reading would block until a writer came.
    std::fs::remove_file(&member).unwrap();
    mknodat(
        rustix::fs::CWD,
        &member,
        FileType::Fifo,
        Mode::RUSR | Mode::WUSR,
        0,
    )
    .unwrap();
    let err = err_text(collect(
        &Bundle::open(&b, Limits::default()).unwrap(),
        &expected(&[&d]),
    ));
    assert!(
        err.contains(&format!("artifacts/{d} is a FIFO, not a regular file")),
        "{err}"
    );
    // A symlink member pointing outside the bundle.
    std::fs::remove_file(&member).unwrap();
    let outside = dir.path().join("outside");
    std::fs::write(&outside, b"x").unwrap();
    std::os::unix::fs::symlink(&outside, &member).unwrap();
    let err = err_text(collect(
        &Bundle::open(&b, Limits::default()).unwrap(),
        &expected(&[&d]),
    ));
    assert!(
        err.contains(&format!(
            "artifacts/{d} is a symbolic link (to {:?})",
            outside.display().to_string()
        )),
        "{err}"
    );
    // The artifacts directory itself a symlink to a directory outside.
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    std::fs::write(elsewhere.join(&d), b"x").unwrap();
    std::fs::remove_dir_all(&arts).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &arts).unwrap();
    let err = err_text(collect(
        &Bundle::open(&b, Limits::default()).unwrap(),
        &expected(&[&d]),
    ));
    assert!(err.contains("artifacts is a symbolic link"), "{err}");
    // bundle.json a FIFO, and a symlink.
    let index_path = b.join("bundle.json");
    std::fs::remove_file(&index_path).unwrap();
    mknodat(
        rustix::fs::CWD,
        &index_path,
        FileType::Fifo,
        Mode::RUSR | Mode::WUSR,
        0,
    )
    .unwrap();
    let err = err_text(Bundle::open(&b, Limits::default()).unwrap().index());
    assert!(err.contains("bundle.json is a FIFO"), "{err}");
    std::fs::remove_file(&index_path).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", &index_path).unwrap();
    let err = err_text(Bundle::open(&b, Limits::default()).unwrap().index());
    assert!(err.contains("bundle.json is a symbolic link"), "{err}");
    // The bundle path itself a FIFO, or a device.
    let fifo = dir.path().join("bundle.tar");
    mknodat(
        rustix::fs::CWD,
        &fifo,
        FileType::Fifo,
        Mode::RUSR | Mode::WUSR,
        0,
    )
    .unwrap();
    let err = err_text(Bundle::open(&fifo, Limits::default()));
    assert!(err.contains("bundle.tar is a FIFO"), "{err}");
    let err = err_text(Bundle::open(Path::new("/dev/zero"), Limits::default()));
    assert!(err.contains("/dev/zero is a character device"), "{err}");

    // The same in a tar: link, FIFO and device entries are refused by their type.
    let json = index_bytes();
    let name = format!("artifacts/{d}");
    for (kind, what) in [
        (EntryType::Symlink, "a symbolic link (to \"/etc/passwd\")"),
        (EntryType::Link, "a hard link"),
        (EntryType::Fifo, "a FIFO"),
        (EntryType::Char, "a character device"),
        (EntryType::Block, "a block device"),
        (EntryType::GNUSparse, "a sparse file"),
    ] {
        let sub = tempfile::tempdir().unwrap();
        let path = raw_tar(
            sub.path(),
            &[
                ("bundle.json", EntryType::Regular, &json, None),
                (&name, kind, b"", None),
            ],
        );
        let err = err_text(collect(
            &Bundle::open(&path, Limits::default()).unwrap(),
            &expected(&[&d]),
        ));
        assert!(
            err.contains(&format!("member \"{name}\" is {what}, not a regular file")),
            "{kind:?}: {err}"
        );
    }
}

#[test]
fn tar_names_outside_the_bundle_or_unknown_are_refused() {
    let json = index_bytes();
    let d = digest('d');
    for (name, want) in [
        (
            "../evil",
            "member \"../evil\" names a path outside the bundle",
        ),
        (
            "/etc/cron.d/x",
            "member \"/etc/cron.d/x\" names a path outside the bundle",
        ),
        (
            "artifacts/../../x",
            "member \"artifacts/../../x\" names a path outside the bundle",
        ),
        ("README", "unexpected member \"README\""),
        (
            "artifacts/notadigest",
            "unexpected member \"artifacts/notadigest\"",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = raw_tar(
            dir.path(),
            &[
                ("bundle.json", EntryType::Regular, &json, None),
                (name, EntryType::Regular, b"x", None),
            ],
        );
        let err = err_text(collect(
            &Bundle::open(&path, Limits::default()).unwrap(),
            &expected(&[&d]),
        ));
        assert!(err.contains(want), "{name}: {err}");
    }
    // Members the signed deployment does not name, twice, or before the index.
    let name = format!("./artifacts/{d}");
    let other = format!("artifacts/{}", digest('e'));
    let dir = tempfile::tempdir().unwrap();
    let path = raw_tar(
        dir.path(),
        &[
            ("bundle.json", EntryType::Regular, &json, None),
            (&other, EntryType::Regular, b"x", None),
        ],
    );
    let err = err_text(collect(
        &Bundle::open(&path, Limits::default()).unwrap(),
        &expected(&[&d]),
    ));
    assert!(
        err.contains(&format!(
            "member {other} is not an artifact the signed deployment names"
        )),
        "{err}"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = raw_tar(
        dir.path(),
        &[
            ("bundle.json", EntryType::Regular, &json, None),
            (&name, EntryType::Regular, b"x", None),
            (&name, EntryType::Regular, b"y", None),
        ],
    );
    let err = err_text(collect(
        &Bundle::open(&path, Limits::default()).unwrap(),
        &expected(&[&d]),
    ));
    assert!(err.contains("appears twice"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let path = raw_tar(
        dir.path(),
        &[
            (&name, EntryType::Regular, b"x", None),
            ("bundle.json", EntryType::Regular, &json, None),
        ],
    );
    let err = err_text(Bundle::open(&path, Limits::default()).unwrap().index());
    assert!(err.contains("comes before bundle.json"), "{err}");
    // Extension headers are refused, not read whole.
    let dir = tempfile::tempdir().unwrap();
    let path = raw_tar(
        dir.path(),
        &[
            (
                "././@LongLink",
                EntryType::GNULongName,
                b"bundle.json",
                None,
            ),
            ("bundle.json", EntryType::Regular, &json, None),
        ],
    );
    let err = err_text(Bundle::open(&path, Limits::default()).unwrap().index());
    assert!(err.contains("unexpected member \"././@LongLink\""), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let path = raw_tar(
        dir.path(),
        &[
            (
                "bundle.json",
                EntryType::XHeader,
                b"30 path=bundle.json\n",
                None,
            ),
            ("bundle.json", EntryType::Regular, &json, None),
        ],
    );
    let err = err_text(Bundle::open(&path, Limits::default()).unwrap().index());
    assert!(err.contains("an extension header"), "{err}");
    // A directory bundle with a file the deployment does not name.
    let b = dir.path().join("b");
    write(&b, &index(), &[(digest('f'), &b"x"[..])]).unwrap();
    let err = err_text(collect(
        &Bundle::open(&b, Limits::default()).unwrap(),
        &expected(&[&d]),
    ));
    assert!(
        err.contains(&format!(
            "member artifacts/{:?} is not an artifact",
            digest('f')
        )),
        "{err}"
    );
}
