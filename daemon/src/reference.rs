//! Checks of the names a client gives: checkpoint references (image names
//! in the grammar of the OCI distribution spec, as `ctr` accepts them) and
//! container ids (containerd's identifier rule). Pure string logic.

use crate::error::ApiError;

/// The longest reference containerd's tools accept.
const MAX_REFERENCE_LEN: usize = 255;

/// Checks `reference` as `[domain[:port]/]path[:tag][@algorithm:hex]`.
pub fn check_reference(reference: &str) -> Result<(), ApiError> {
    let malformed = |reason: &str| ApiError::MalformedReference {
        reference: reference.to_string(),
        reason: reason.to_string(),
    };
    if reference.is_empty() {
        return Err(malformed("it is empty"));
    }
    if reference.len() > MAX_REFERENCE_LEN {
        return Err(malformed("it is longer than 255 characters"));
    }
    let (name_tag, digest) = match reference.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (reference, None),
    };
    if let Some(digest) = digest {
        check_digest(digest).map_err(|r| malformed(&r))?;
    }
    // A ':' after the last '/' starts the tag; one before it is a port.
    let last_slash = name_tag.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match name_tag[last_slash..].find(':') {
        Some(i) => (
            &name_tag[..last_slash + i],
            Some(&name_tag[last_slash + i + 1..]),
        ),
        None => (name_tag, None),
    };
    if let Some(tag) = tag {
        check_tag(tag).map_err(|r| malformed(&r))?;
    }
    let mut components: Vec<&str> = name.split('/').collect();
    if components.len() > 1 && looks_like_domain(components[0]) {
        check_domain(components[0]).map_err(|r| malformed(&r))?;
        components.remove(0);
    }
    for component in components {
        check_path_component(component).map_err(|r| malformed(&r))?;
    }
    Ok(())
}

/// Checks the name of a checkpoint that may exist already: image names
/// other tools made need not follow the grammar (`ctr task checkpoint`
/// puts a ':' in the tag), so only what no image name holds is refused.
pub fn check_existing_reference(reference: &str) -> Result<(), ApiError> {
    let malformed = |reason: &str| ApiError::MalformedReference {
        reference: reference.to_string(),
        reason: reason.to_string(),
    };
    if reference.is_empty() {
        return Err(malformed("it is empty"));
    }
    if reference.len() > MAX_REFERENCE_LEN {
        return Err(malformed("it is longer than 255 characters"));
    }
    if reference
        .chars()
        .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(malformed("it has a space or a control character"));
    }
    Ok(())
}

/// Checks a container id as containerd does: letters, digits, `.`, `_`
/// and `-`, starting with a letter or digit, at most 76 characters.
pub fn check_container_id(field: &'static str, id: &str) -> Result<(), ApiError> {
    let invalid = |reason: &str| ApiError::InvalidArgument {
        field,
        value: id.to_string(),
        reason: reason.to_string(),
    };
    if id.is_empty() {
        return Err(invalid("it is empty"));
    }
    if id.len() > 76 {
        return Err(invalid("it is longer than 76 characters"));
    }
    if !id.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(invalid("it must start with a letter or a digit"));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(invalid(&format!(
            "{c:?} is not allowed (letters, digits, '.', '_', '-')"
        )));
    }
    Ok(())
}

/// The first component is a domain when it has a '.' or a port, or is
/// `localhost`, as in the distribution spec.
fn looks_like_domain(component: &str) -> bool {
    component.contains('.') || component.contains(':') || component == "localhost"
}

fn check_domain(domain: &str) -> Result<(), String> {
    let (host, port) = match domain.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (domain, None),
    };
    if let Some(port) = port {
        if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!(
                "port {port:?} of domain {domain:?} is not a number"
            ));
        }
    }
    for label in host.split('.') {
        let ok = !label.is_empty()
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(format!("domain {domain:?} is not a host name"));
        }
    }
    Ok(())
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn check_path_component(component: &str) -> Result<(), String> {
    let bad = || {
        format!(
            "path component {component:?} must be lowercase letters and digits separated by '.', '_', '__' or '-'"
        )
    };
    if component.is_empty() {
        return Err("it has an empty path component".to_string());
    }
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return Err(bad());
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let separator = &component[start..i];
        let ok = separator == "."
            || separator == "_"
            || separator == "__"
            || separator.bytes().all(|b| b == b'-');
        if !ok {
            return Err(bad());
        }
    }
    Ok(())
}

/// `[\w][\w.-]{0,127}`
fn check_tag(tag: &str) -> Result<(), String> {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let ok = tag.len() <= 128
        && tag.starts_with(word)
        && tag.chars().all(|c| word(c) || c == '.' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "tag {tag:?} must be letters, digits, '_', '.' and '-' (not first), at most 128"
        ))
    }
}

fn check_digest(digest: &str) -> Result<(), String> {
    match digest.split_once(':') {
        Some(("sha256", hex))
            if hex.len() == 64
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) =>
        {
            Ok(())
        }
        _ => Err(format!(
            "digest {digest:?} is not sha256:<64 lowercase hex digits>"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_what_ctr_accepts() {
        for r in [
            "checkpoint",
            "cowsnap.test/checkpoint:1",
            "localhost:5000/a/b-c__d.e:v1.2-rc_3",
            "example.com/app@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ] {
            check_reference(r).unwrap_or_else(|e| panic!("{r}: {e}"));
        }
    }

    #[test]
    fn refuses_malformed_references_saying_why() {
        for (r, why) in [
            ("", "empty"),
            ("Upper/case", "lowercase"),
            ("a//b", "empty path component"),
            ("a/b:", "tag"),
            ("a/b:-x", "tag"),
            ("a b", "lowercase"),
            ("a@sha256:xyz", "digest"),
            ("bad_host-.com:99/x", "host name"),
            ("host.com:port/x", "not a number"),
        ] {
            let err = check_reference(r).expect_err(r).to_string();
            assert!(err.contains(why), "{r}: {err}");
            assert!(
                err.contains(&format!("{r:?}")),
                "{r}: {err} does not name it"
            );
        }
    }

    #[test]
    fn existing_references_may_be_ctr_task_checkpoint_names() {
        check_existing_reference("containerd.io/checkpoint/counter:01-02-2006-15:04:05").unwrap();
        assert!(check_reference("containerd.io/checkpoint/counter:01-02-2006-15:04:05").is_err());
        for r in ["", "a b", "a\nb"] {
            assert!(check_existing_reference(r).is_err(), "{r:?}");
        }
    }

    #[test]
    fn container_ids() {
        check_container_id("container_id", "counter-1.a_b").unwrap();
        for id in ["", "-x", "a/b", "a b", &"x".repeat(77)] {
            assert!(check_container_id("container_id", id).is_err(), "{id:?}");
        }
    }
}
