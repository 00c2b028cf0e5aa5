//! Tag expansion (`<TAG/>`) and variable substitution (`#{key}`).

use crate::emit::{Expansion, Leaves};

/// Built-in variables and their values (no per-cluster variables exist in the snapshot yet).
const DEFAULT_VARIABLES: &[(&str, &str)] = &[
    ("MESH_IP", "127.0.0.1"),
    ("MESH_PORT", "31001"),
    ("MESH_TIMEOUT_CONTROL_HEADER", "x-service-mesh-timeout"),
];

/// Composite tags nest at most this deep; a deeper nesting is left unexpanded (built-in tags
/// nest two levels).
const MAX_DEPTH: usize = 8;

/// Replaces every known `#{key}` by its value; unknown variables are left as written.
pub(crate) fn substitute_variables(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("#{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let value = after.find('}').and_then(|end| {
            DEFAULT_VARIABLES
                .iter()
                .find(|(key, _)| *key == &after[..end])
                .map(|(_, value)| (end, *value))
        });
        match value {
            Some((end, value)) => {
                out.push_str(value);
                rest = &after[end + 1..];
            }
            None => {
                out.push_str("#{");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Expands every `<TAG/>` of `text`. Generated text is indented like the tag when the tag starts
/// its line; unknown tags are wrapped in a `/* */` comment.
pub(crate) fn expand(text: &str, leaves: &Leaves) -> String {
    expand_at_depth(text, leaves, 0)
}

fn expand_at_depth(text: &str, leaves: &Leaves, depth: usize) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find('<') {
        out.push_str(&rest[..start]);
        let candidate = &rest[start..];
        let Some((tag, length)) = parse_tag(candidate) else {
            out.push('<');
            rest = &candidate[1..];
            continue;
        };
        let indent = current_indent(&out).to_owned();
        let expansion = match leaves.get(tag) {
            Some(Expansion::Leaf(body)) => body.to_owned(),
            Some(Expansion::Composite(body)) if depth < MAX_DEPTH => {
                expand_at_depth(body, leaves, depth + 1)
            }
            _ => format!("/* <{tag}/> */"),
        };
        push_indented(&mut out, &expansion, &indent);
        rest = &candidate[length..];
    }
    out.push_str(rest);
    out
}

/// Parses `<NAME/>` at the start of `text` (NAME: an upper-case letter, then upper-case letters,
/// digits and `_`); returns the name and the length of the tag.
fn parse_tag(text: &str) -> Option<(&str, usize)> {
    let body = text.strip_prefix('<')?;
    let end = body.find("/>")?;
    let name = &body[..end];
    let mut chars = name.chars();
    let valid = chars.next().is_some_and(|c| c.is_ascii_uppercase())
        && chars.all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
    valid.then_some((name, end + 3))
}

/// Returns the whitespace that precedes the cursor on the current line, or "" when the line has
/// anything else before the cursor.
fn current_indent(out: &str) -> &str {
    let line_start = out.rfind('\n').map_or(0, |i| i + 1);
    let line = &out[line_start..];
    if line.chars().all(|c| c == ' ' || c == '\t') {
        line
    } else {
        ""
    }
}

/// Appends `text`, indenting its non-empty lines after the first with `indent`.
fn push_indented(out: &mut String, text: &str, indent: &str) {
    let indent = indent.to_owned();
    for (index, line) in text.split('\n').enumerate() {
        if index > 0 {
            out.push('\n');
            if !line.is_empty() {
                out.push_str(&indent);
            }
        }
        out.push_str(line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_variables_are_substituted() {
        assert_eq!(
            substitute_variables("a #{MESH_IP}:#{MESH_PORT} #{MESH_TIMEOUT_CONTROL_HEADER}"),
            "a 127.0.0.1:31001 x-service-mesh-timeout"
        );
    }

    #[test]
    fn unknown_and_unclosed_variables_are_left_alone() {
        assert_eq!(
            substitute_variables("#{NOPE} #{MESH_IP #{MESH_IP}"),
            "#{NOPE} #{MESH_IP 127.0.0.1"
        );
    }

    #[test]
    fn tags_are_parsed() {
        assert_eq!(parse_tag("<VCL/>rest"), Some(("VCL", 6)));
        assert_eq!(parse_tag("<DIRECTOR_A1/>"), Some(("DIRECTOR_A1", 14)));
        assert_eq!(parse_tag("<vcl/>"), None);
        assert_eq!(parse_tag("< VCL/>"), None);
        assert_eq!(parse_tag("<VCL>"), None);
        assert_eq!(parse_tag("<1A/>"), None);
    }

    #[test]
    fn indentation_follows_the_tag() {
        let mut out = String::from("sub x {\n    ");
        let indent = current_indent(&out).to_owned();
        push_indented(&mut out, "a;\n\nb;", &indent);
        assert_eq!(out, "sub x {\n    a;\n\n    b;");
        assert_eq!(current_indent("x = "), "");
    }
}
