//! The layout of a checkpoint in containerd's stores, as `ctr container
//! checkpoint --task` writes it (containerd 1.6's `Container.Checkpoint`
//! with `WithCheckpointRuntime` and `WithCheckpointTask`), so that the
//! two tools restore each other's checkpoints:
//!
//! ```text
//! image NAME ──► OCI index (JSON)          annotations: checkpointed image,
//!                 │                                      runtime, snapshotter
//!                 ├─ runtime options       (the container's runtime Any, proto)
//!                 ├─ checkpoint            (tar of the task's cowsnap image)
//!                 ├─ config                (the container's spec Any, proto)
//!                 ├─ checkpoint options    (runc CheckpointOptions Any, proto)
//!                 └─ rw layer              (optional, gzip tar diff)
//! ```
//!
//! Every blob is referenced from the index by a `containerd.io/gc.ref.content.N`
//! label so containerd's garbage collector keeps them with the image.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub const MEDIA_TYPE_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_TYPE_DOCKER_LIST: &str =
    "application/vnd.docker.distribution.manifest.list.v2+json";
pub const MEDIA_TYPE_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_TYPE_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// The task's image: containerd calls any runtime's checkpoint by runc's name.
pub const MEDIA_TYPE_CHECKPOINT: &str =
    "application/vnd.containerd.container.criu.checkpoint.criu.tar";
pub const MEDIA_TYPE_CONFIG: &str =
    "application/vnd.containerd.container.checkpoint.config.v1+proto";
pub const MEDIA_TYPE_OPTIONS: &str =
    "application/vnd.containerd.container.checkpoint.options.v1+proto";
pub const MEDIA_TYPE_RUNTIME_OPTIONS: &str =
    "application/vnd.containerd.container.checkpoint.runtime.options+proto";

/// The container's writable layer (`ctr container checkpoint --rw`): a
/// gzip tar diff of its rootfs snapshot against the image's.
pub const MEDIA_TYPE_RW_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// The same, as Docker's media type names it.
pub const MEDIA_TYPE_DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

pub const ANNOTATION_IMAGE: &str = "org.opencontainers.image.ref.name";
pub const ANNOTATION_RUNTIME: &str = "io.containerd.checkpoint.runtime";
pub const ANNOTATION_SNAPSHOTTER: &str = "io.containerd.checkpoint.snapshotter";
/// cowsnapd's own: the checkpointed container's id.
pub const ANNOTATION_CONTAINER: &str = "io.cowsnap.checkpoint.container";

/// An OCI descriptor as the index JSON holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OciDescriptor {
    #[serde(rename = "mediaType")]
    pub media_type: String,
    pub digest: String,
    pub size: i64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
}

impl Platform {
    /// linux and the architecture in the OCI's (Go's) words.
    pub fn host() -> Platform {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            other => other,
        };
        Platform {
            architecture: architecture.to_string(),
            os: "linux".to_string(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OciIndex {
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    #[serde(rename = "mediaType", default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub manifests: Vec<OciDescriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// An image manifest, for the layers a container's rootfs is made of.
#[derive(Debug, Clone, Deserialize)]
pub struct OciManifest {
    pub config: OciDescriptor,
}

/// The part of an image config that names the rootfs layers.
#[derive(Debug, Clone, Deserialize)]
pub struct ImageConfig {
    pub rootfs: RootFs,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RootFs {
    pub diff_ids: Vec<String>,
}

impl OciIndex {
    pub fn new() -> OciIndex {
        OciIndex {
            schema_version: 2,
            media_type: Some(MEDIA_TYPE_INDEX.to_string()),
            manifests: Vec::new(),
            annotations: BTreeMap::new(),
        }
    }

    /// The writable layer, if the checkpoint holds one.
    pub fn rw_layer(&self) -> Option<&OciDescriptor> {
        self.by_media_type(MEDIA_TYPE_RW_LAYER)
            .or_else(|| self.by_media_type(MEDIA_TYPE_DOCKER_LAYER_GZIP))
    }

    pub fn by_media_type(&self, media_type: &str) -> Option<&OciDescriptor> {
        self.manifests.iter().find(|m| m.media_type == media_type)
    }

    /// Why this index is not a checkpoint a container can be restored
    /// from, or None.
    pub fn not_restorable(&self) -> Option<String> {
        for (key, what) in [
            (ANNOTATION_IMAGE, "the checkpointed image"),
            (ANNOTATION_RUNTIME, "the runtime"),
            (ANNOTATION_SNAPSHOTTER, "the snapshotter"),
        ] {
            if !matches!(self.annotations.get(key), Some(v) if !v.is_empty()) {
                return Some(format!(
                    "its index has no annotation {key} ({what}); `ctr task checkpoint` makes such task-only checkpoints"
                ));
            }
        }
        for (media_type, what) in [
            (MEDIA_TYPE_CHECKPOINT, "task checkpoint"),
            (MEDIA_TYPE_CONFIG, "container spec"),
        ] {
            if self.by_media_type(media_type).is_none() {
                return Some(format!("its index has no {what} ({media_type})"));
            }
        }
        None
    }

    /// The `containerd.io/gc.ref.content.N` labels of the index blob.
    pub fn gc_labels(&self) -> std::collections::HashMap<String, String> {
        self.manifests
            .iter()
            .enumerate()
            .map(|(i, m)| {
                (
                    format!("containerd.io/gc.ref.content.{i}"),
                    m.digest.clone(),
                )
            })
            .collect()
    }
}

impl Default for OciIndex {
    fn default() -> Self {
        OciIndex::new()
    }
}

pub fn is_index_media_type(media_type: &str) -> bool {
    media_type == MEDIA_TYPE_INDEX || media_type == MEDIA_TYPE_DOCKER_LIST
}

/// The chain id of a rootfs made of `diff_ids` (the snapshot key of its
/// top layer): chain(0) = diff(0), chain(n) = sha256(chain(n-1) + " " + diff(n)).
pub fn chain_id(diff_ids: &[String]) -> Option<String> {
    use sha2::{Digest, Sha256};
    let mut ids = diff_ids.iter();
    let mut chain = ids.next()?.clone();
    for diff in ids {
        let hash = Sha256::digest(format!("{chain} {diff}").as_bytes());
        chain = format!("sha256:{}", crate::ctrd::hex_lower(&hash));
    }
    Some(chain)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The index `ctr container checkpoint --task` wrote on containerd 1.6
    /// (digests shortened by hand, structure as written).
    const CTR_INDEX: &str = r#"{"schemaVersion":2,"manifests":[
        {"mediaType":"application/vnd.containerd.container.checkpoint.runtime.options+proto","digest":"sha256:aa","size":38,"platform":{"architecture":"amd64","os":"linux"}},
        {"mediaType":"application/vnd.containerd.container.criu.checkpoint.criu.tar","digest":"sha256:bb","size":1024,"platform":{"architecture":"amd64","os":"linux"}},
        {"mediaType":"application/vnd.containerd.container.checkpoint.config.v1+proto","digest":"sha256:cc","size":2000,"platform":{"architecture":"amd64","os":"linux"}},
        {"mediaType":"application/vnd.containerd.container.checkpoint.options.v1+proto","digest":"sha256:dd","size":60,"platform":{"architecture":"amd64","os":"linux"}}],
        "annotations":{"io.containerd.checkpoint.runtime":"io.containerd.cowsnap.v1","io.containerd.checkpoint.snapshotter":"overlayfs","org.opencontainers.image.ref.name":"cowsnap.test/ref:1"}}"#;

    #[test]
    fn ctr_container_checkpoint_index_is_restorable() {
        let index: OciIndex = serde_json::from_str(CTR_INDEX).unwrap();
        assert_eq!(index.not_restorable(), None);
        assert_eq!(
            index.by_media_type(MEDIA_TYPE_CHECKPOINT).unwrap().size,
            1024
        );
        let labels = index.gc_labels();
        assert_eq!(labels["containerd.io/gc.ref.content.1"], "sha256:bb");
    }

    #[test]
    fn task_only_checkpoint_is_not_restorable_and_says_why() {
        let mut index: OciIndex = serde_json::from_str(CTR_INDEX).unwrap();
        index.annotations.remove(ANNOTATION_SNAPSHOTTER);
        let why = index.not_restorable().unwrap();
        assert!(why.contains(ANNOTATION_SNAPSHOTTER), "{why}");
    }

    #[test]
    fn chain_id_of_one_and_two_layers() {
        let a = "sha256:".to_string() + &"a".repeat(64);
        let b = "sha256:".to_string() + &"b".repeat(64);
        assert_eq!(chain_id(std::slice::from_ref(&a)), Some(a.clone()));
        let two = chain_id(&[a.clone(), b.clone()]).unwrap();
        assert_eq!(two.len(), 7 + 64);
        assert_ne!(two, a);
        assert_eq!(chain_id(&[]), None);
    }
}
