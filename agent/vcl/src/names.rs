//! VCL symbol names built from user data, and their validation.

use crate::RenderError;

/// Longest backend name, as in the original VaaS.
const MAX_BACKEND_NAME: usize = 64;
/// Longest director or probe name accepted by the API.
const MAX_IDENTIFIER: usize = 50;

/// Tells whether `name` matches `[A-Za-z][A-Za-z0-9_]{0,49}`, the form the API accepts for the
/// names of directors and probes.
pub(crate) fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= MAX_IDENTIFIER
}

/// Checks a director name against `[A-Za-z][A-Za-z0-9_]{0,49}`.
pub(crate) fn check_director_name(director_id: i64, name: &str) -> Result<(), RenderError> {
    if is_identifier(name) {
        Ok(())
    } else {
        Err(RenderError::InvalidDirectorName {
            director_id,
            name: name.to_owned(),
        })
    }
}

/// Validates a datacenter symbol (`[A-Za-z0-9_-]+`) and returns its VCL form (`-` becomes `_`).
pub(crate) fn dc_symbol(dc_id: i64, symbol: &str) -> Result<String, RenderError> {
    let valid = !symbol.is_empty()
        && symbol
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !valid {
        return Err(RenderError::InvalidDcSymbol {
            dc_id,
            symbol: symbol.to_owned(),
        });
    }
    Ok(symbol.replace('-', "_"))
}

/// Builds a backend's VCL name from its director, id, dc, address and port: every character
/// outside `[A-Za-z0-9_]` becomes `_`, and the director part is shortened so the name fits in 64
/// characters (the whole name is cut when even one director character does not fit).
pub(crate) fn backend_name(director: &str, id: i64, dc: &str, host: &str, port: u32) -> String {
    let suffix = sanitize(&format!("_{id}_{dc}_{host}_{port}"));
    let director = sanitize(director);
    let room = MAX_BACKEND_NAME.saturating_sub(suffix.len()).max(1);
    let mut name: String = director.chars().take(room).collect();
    if !name.starts_with(|c: char| c.is_ascii_alphabetic()) {
        name.insert(0, 'b');
    }
    name.push_str(&suffix);
    name.truncate(MAX_BACKEND_NAME);
    name
}

/// Replaces every character outside `[A-Za-z0-9_]` by `_`.
fn sanitize(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_name_joins_the_parts() {
        assert_eq!(
            backend_name("api", 7, "dc_1", "10.0.0.1", 8080),
            "api_7_dc_1_10_0_0_1_8080"
        );
    }

    #[test]
    fn backend_name_sanitizes_ipv6() {
        assert_eq!(backend_name("api", 7, "dc1", "::1", 80), "api_7_dc1___1_80");
    }

    #[test]
    fn backend_name_shortens_the_director_part() {
        let director = "d".repeat(50);
        let name = backend_name(&director, 123, "dc1", "2001:db8::1", 80);
        assert_eq!(name.len(), 64);
        assert!(name.ends_with("_123_dc1_2001_db8__1_80"));
        assert!(name.starts_with("ddd"));
    }

    #[test]
    fn backend_name_is_cut_when_the_suffix_alone_is_too_long() {
        let name = backend_name("api", i64::MAX, &"x".repeat(40), "10.0.0.1", 80);
        assert_eq!(name.len(), 64);
        assert!(name.starts_with("a_9223372036854775807_xxx"));
    }

    #[test]
    fn director_names_are_checked() {
        assert!(check_director_name(1, "api_v2").is_ok());
        assert!(check_director_name(1, &"a".repeat(50)).is_ok());
        for bad in [
            "",
            "1api",
            "_api",
            "api-v2",
            "api\"",
            "a b",
            &"a".repeat(51),
        ] {
            assert!(check_director_name(1, bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn dc_symbols_are_checked_and_converted() {
        assert_eq!(dc_symbol(1, "fra-1").as_deref(), Ok("fra_1"));
        assert!(dc_symbol(1, "").is_err());
        assert!(dc_symbol(1, "fra 1").is_err());
        assert!(dc_symbol(1, "fra\"1").is_err());
    }
}
