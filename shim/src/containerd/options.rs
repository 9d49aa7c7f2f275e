//! Decoding the `Any` options containerd puts in Create and Checkpoint
//! requests. containerd marks each with a type url; the runc shim's message
//! types are accepted under their current and their legacy names, and an
//! absent option means the defaults.

use std::path::PathBuf;

use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::Message;
use containerd_shim_protos::shim::oci::{CheckpointOptions, Options};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OptionsError {
    #[error("{field}: unsupported options type {type_url:?}")]
    UnknownType {
        field: &'static str,
        type_url: String,
    },
    #[error("{field}: decoding {type_url}: {detail}")]
    Decode {
        field: &'static str,
        type_url: String,
        detail: String,
    },
}

const CREATE_OPTION_TYPES: &[&str] = &["containerd.runc.v1.Options"];
const CHECKPOINT_OPTION_TYPES: &[&str] = &[
    "containerd.runc.v1.CheckpointOptions",
    "containerd.linux.runc.CheckpointOptions",
];

/// The message name of a type url (`type.googleapis.com/pkg.Msg` or `pkg.Msg`).
fn type_name(type_url: &str) -> &str {
    type_url.rsplit('/').next().unwrap_or(type_url)
}

fn decode<M: Message>(
    field: &'static str,
    any: Option<&Any>,
    accepted: &[&str],
) -> Result<Option<M>, OptionsError> {
    let Some(any) = any else { return Ok(None) };
    if any.type_url.is_empty() && any.value.is_empty() {
        return Ok(None);
    }
    if !accepted.contains(&type_name(&any.type_url)) {
        return Err(OptionsError::UnknownType {
            field,
            type_url: any.type_url.clone(),
        });
    }
    M::parse_from_bytes(&any.value)
        .map(Some)
        .map_err(|e| OptionsError::Decode {
            field,
            type_url: any.type_url.clone(),
            detail: e.to_string(),
        })
}

/// What the shim uses of runc's create `Options`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuncOptions {
    pub binary_name: Option<String>,
    pub root: Option<PathBuf>,
    pub systemd_cgroup: bool,
    pub no_pivot_root: bool,
}

pub fn create_options(any: Option<&Any>) -> Result<RuncOptions, OptionsError> {
    let Some(o) = decode::<Options>("CreateTaskRequest.options", any, CREATE_OPTION_TYPES)? else {
        return Ok(RuncOptions::default());
    };
    let nonempty = |s: &str| (!s.is_empty()).then(|| s.to_string());
    Ok(RuncOptions {
        binary_name: nonempty(&o.binary_name),
        root: nonempty(&o.root).map(PathBuf::from),
        systemd_cgroup: o.systemd_cgroup,
        no_pivot_root: o.no_pivot_root,
    })
}

/// What Checkpoint takes from runc's `CheckpointOptions`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckpointOpts {
    pub exit: bool,
    pub image_path: Option<PathBuf>,
    pub work_path: Option<PathBuf>,
}

pub fn checkpoint_options(any: Option<&Any>) -> Result<CheckpointOpts, OptionsError> {
    let Some(o) = decode::<CheckpointOptions>(
        "CheckpointTaskRequest.options",
        any,
        CHECKPOINT_OPTION_TYPES,
    )?
    else {
        return Ok(CheckpointOpts::default());
    };
    let path = |s: &str| (!s.is_empty()).then(|| PathBuf::from(s));
    Ok(CheckpointOpts {
        exit: o.exit,
        image_path: path(&o.image_path),
        work_path: path(&o.work_path),
    })
}

/// The JSON bytes of an OCI document carried in an `Any` (exec process spec,
/// update resources): containerd marshals those as JSON, not protobuf.
pub fn json_payload<'a>(
    field: &'static str,
    any: Option<&'a Any>,
) -> Result<&'a [u8], OptionsError> {
    let any = any
        .filter(|a| !a.value.is_empty())
        .ok_or(OptionsError::Decode {
            field,
            type_url: String::new(),
            detail: "missing".into(),
        })?;
    serde_json::from_slice::<serde_json::Value>(&any.value).map_err(|e| OptionsError::Decode {
        field,
        type_url: any.type_url.clone(),
        detail: format!("not JSON: {e}"),
    })?;
    Ok(&any.value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn any(type_url: &str, msg: &dyn containerd_shim_protos::protobuf::MessageDyn) -> Any {
        Any {
            type_url: type_url.into(),
            value: msg.write_to_bytes_dyn().unwrap(),
            ..Default::default()
        }
    }

    #[test]
    fn absent_checkpoint_options_are_defaults() {
        assert_eq!(checkpoint_options(None).unwrap(), CheckpointOpts::default());
        assert_eq!(
            checkpoint_options(Some(&Any::default())).unwrap(),
            CheckpointOpts::default()
        );
    }

    #[test]
    fn checkpoint_options_under_both_type_urls() {
        let mut o = CheckpointOptions::new();
        o.exit = true;
        o.image_path = "/var/img".into();
        o.work_path = "/var/work".into();
        for url in [
            "containerd.runc.v1.CheckpointOptions",
            "containerd.linux.runc.CheckpointOptions",
            "type.googleapis.com/containerd.runc.v1.CheckpointOptions",
        ] {
            let got = checkpoint_options(Some(&any(url, &o))).unwrap();
            assert_eq!(
                got,
                CheckpointOpts {
                    exit: true,
                    image_path: Some("/var/img".into()),
                    work_path: Some("/var/work".into()),
                },
                "{url}"
            );
        }
        o.exit = false;
        o.image_path.clear();
        let got =
            checkpoint_options(Some(&any("containerd.runc.v1.CheckpointOptions", &o))).unwrap();
        assert!(!got.exit);
        assert_eq!(got.image_path, None);
    }

    #[test]
    fn other_types_and_garbage_are_refused() {
        let o = CheckpointOptions::new();
        let e = checkpoint_options(Some(&any("containerd.runc.v1.Options", &o))).unwrap_err();
        assert!(matches!(e, OptionsError::UnknownType { .. }), "{e}");
        let bad = Any {
            type_url: "containerd.runc.v1.CheckpointOptions".into(),
            value: vec![0xff, 0xff, 0xff],
            ..Default::default()
        };
        assert!(matches!(
            checkpoint_options(Some(&bad)),
            Err(OptionsError::Decode { .. })
        ));
    }

    #[test]
    fn create_options_pick_root_binary_and_flags() {
        assert_eq!(create_options(None).unwrap(), RuncOptions::default());
        let mut o = Options::new();
        o.root = "/run/r".into();
        o.binary_name = "runc-x".into();
        o.systemd_cgroup = true;
        let got = create_options(Some(&any("containerd.runc.v1.Options", &o))).unwrap();
        assert_eq!(
            got,
            RuncOptions {
                binary_name: Some("runc-x".into()),
                root: Some("/run/r".into()),
                systemd_cgroup: true,
                no_pivot_root: false,
            }
        );
    }

    #[test]
    fn json_payload_must_be_json() {
        let a = Any {
            type_url: "types.containerd.io/opencontainers/runtime-spec/1/Process".into(),
            value: br#"{"args":["sh"]}"#.to_vec(),
            ..Default::default()
        };
        assert_eq!(json_payload("spec", Some(&a)).unwrap(), a.value.as_slice());
        assert!(json_payload("spec", None).is_err());
        let b = Any {
            value: b"\x01\x02".to_vec(),
            ..a
        };
        assert!(json_payload("spec", Some(&b)).is_err());
    }
}
