//! Tag expansion (`<TAG/>`), template blocks and variable substitution (`#{key}`).
//!
//! Expansion is one left-to-right pass over each text (the template, a block, a built-in
//! composite body) that writes into a single output buffer; nothing is ever scanned twice from
//! the start. A `<` or `#{` that does not start a tag or a known variable costs the characters
//! of its name and is written as is, so a megabyte of `<` is read once. Work is therefore linear
//! in what is read plus what is written, and both are capped at [`MAX_EXPANSION_BYTES`].

use std::collections::BTreeMap;
use std::ops::Range;

use vaas_proto::v1::VclTemplateBlock;

use crate::emit::{Expansion, Leaves};
use crate::variables::Variables;
use crate::{MAX_EXPANSION_BYTES, RenderError};

/// The tags a template block can replace. The API refuses blocks for other tags; one that
/// reaches the renderer anyway is ignored.
pub const OVERRIDABLE_TAGS: &[&str] = &[
    "VCL",
    "HEADERS",
    "ACL",
    "BACKENDS",
    "DIRECTORS",
    "RECV",
    "ROUTER",
    "FLEXIBLE_ROUTER",
    "PROPER_PROTOCOL_REDIRECT",
    "VCL_PIPE",
    "OTHER_FUNCTIONS",
    "EMPTY_DIRECTOR_SYNTH",
];

/// Expansions nest at most this deep; a deeper tag is left commented out. The recursion rule
/// already bounds nesting (a block is used at most once on a path, built-in composites nest two
/// levels, so well under 40), this only protects the stack should that ever change.
const MAX_DEPTH: usize = 64;

/// The template blocks of one template, by tag.
#[derive(Debug, Default)]
pub(crate) struct Blocks<'a> {
    by_tag: BTreeMap<&'a str, &'a str>,
}

impl<'a> Blocks<'a> {
    /// Collects the blocks of template `template_id` for overridable tags.
    pub(crate) fn of_template(blocks: &'a [VclTemplateBlock], template_id: i64) -> Blocks<'a> {
        // One block per template and tag is the API's rule; should two arrive anyway, the lowest
        // id wins, so the output does not depend on the snapshot's order.
        let mut by_id: Vec<&VclTemplateBlock> = blocks
            .iter()
            .filter(|block| block.template_id == template_id)
            .filter(|block| OVERRIDABLE_TAGS.contains(&block.tag.as_str()))
            .collect();
        by_id.sort_by_key(|block| block.id);
        let mut by_tag = BTreeMap::new();
        for block in by_id {
            by_tag
                .entry(block.tag.as_str())
                .or_insert(block.content.as_str());
        }
        Blocks { by_tag }
    }

    /// Tells whether the template has a block for `tag`.
    pub(crate) fn contains(&self, tag: &str) -> bool {
        self.by_tag.contains_key(tag)
    }

    /// Tells whether the template has no block at all.
    pub(crate) fn is_empty(&self) -> bool {
        self.by_tag.is_empty()
    }

    fn get(&self, tag: &str) -> Option<&'a str> {
        self.by_tag.get(tag).copied()
    }
}

/// Expands every `<TAG/>` of `template` and substitutes its `#{key}` variables.
///
/// A tag expands to its block when the template has one and the tag is not already being
/// expanded on the current path, otherwise to its built-in body (a block that names its own tag
/// thus includes the built-in body there); a tag without either is wrapped in a `/* */` comment.
/// Variables are substituted in template and block text only: generated text and variable
/// values are written as they are, never scanned for tags or variables. Generated text is
/// indented like the tag when the tag starts its line.
pub(crate) fn expand(
    template: &str,
    leaves: &Leaves,
    blocks: &Blocks,
    variables: &Variables,
) -> Result<String, RenderError> {
    expand_with_limit(template, leaves, blocks, variables, MAX_EXPANSION_BYTES)
}

fn expand_with_limit(
    template: &str,
    leaves: &Leaves,
    blocks: &Blocks,
    variables: &Variables,
    limit: usize,
) -> Result<String, RenderError> {
    let mut expander = Expander {
        leaves,
        blocks,
        variables,
        out: Output::new(limit),
        read: 0,
        limit,
        path: Vec::new(),
    };
    expander.expand_text(template, &(0..0), Source::Configured)?;
    Ok(expander.out.text)
}

/// Where a text comes from, which decides whether variables apply to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// The template or a block: variables are substituted.
    Configured,
    /// A built-in composite body: written by this crate, left alone.
    BuiltIn,
}

struct Expander<'a> {
    leaves: &'a Leaves,
    blocks: &'a Blocks<'a>,
    variables: &'a Variables<'a>,
    out: Output,
    /// Bytes of template, block and composite text read so far, a block counting each time its
    /// tag expands: this bounds the work even when expansions write nothing.
    read: usize,
    limit: usize,
    /// The tags being expanded, outermost first.
    path: Vec<&'a str>,
}

impl<'a> Expander<'a> {
    /// Writes `text` with its tags expanded; `indent` (a range of the output) is written after
    /// each of its line breaks.
    fn expand_text(
        &mut self,
        text: &'a str,
        indent: &Range<usize>,
        source: Source,
    ) -> Result<(), RenderError> {
        self.read = self.read.saturating_add(text.len());
        if self.read > self.limit {
            return Err(RenderError::TooLarge { limit: self.limit });
        }
        let specials: &[char] = match source {
            Source::Configured => &['<', '#'],
            Source::BuiltIn => &['<'],
        };
        // `literal` starts the text not yet written; `cursor` is where the search goes on.
        let mut literal = 0;
        let mut cursor = 0;
        while let Some(offset) = text[cursor..].find(specials) {
            let at = cursor + offset;
            let candidate = &text[at..];
            if let Some((tag, length)) = parse_tag(candidate) {
                self.out.write(&text[literal..at], indent)?;
                self.expand_tag(tag, indent)?;
                cursor = at + length;
                literal = cursor;
                continue;
            }
            if let Some((key, length)) = parse_variable(candidate)
                && let Some(value) = self.variables.get(key)
            {
                self.out.write(&text[literal..at], indent)?;
                // A value holds no line break (checked), so it needs no indentation.
                self.out.write(value, indent)?;
                cursor = at + length;
                literal = cursor;
                continue;
            }
            // Not a tag nor a known variable: the character stays in the literal text.
            cursor = at + 1;
        }
        self.out.write(&text[literal..], indent)
    }

    fn expand_tag(&mut self, tag: &'a str, indent: &Range<usize>) -> Result<(), RenderError> {
        let tag_indent = self.out.tag_indent(indent);
        let deep_enough = self.path.len() >= MAX_DEPTH;
        // A tag already being expanded on this path gets its built-in body: a RECV block that
        // says <RECV/> wraps the built-in RECV instead of recursing forever.
        if !deep_enough
            && !self.path.contains(&tag)
            && let Some(content) = self.blocks.get(tag)
        {
            return self.expand_nested(tag, content, &tag_indent, Source::Configured);
        }
        match self.leaves.get(tag) {
            Some(Expansion::Leaf(body)) => self.out.write(body, &tag_indent),
            Some(Expansion::Composite(body)) if !deep_enough => {
                self.expand_nested(tag, body, &tag_indent, Source::BuiltIn)
            }
            _ => {
                self.out.write("/* <", &tag_indent)?;
                self.out.write(tag, &tag_indent)?;
                self.out.write("/> */", &tag_indent)
            }
        }
    }

    fn expand_nested(
        &mut self,
        tag: &'a str,
        text: &'a str,
        indent: &Range<usize>,
        source: Source,
    ) -> Result<(), RenderError> {
        self.path.push(tag);
        let expanded = self.expand_text(text, indent, source);
        self.path.pop();
        expanded
    }
}

/// The rendered text, written once, front to back, with what indentation needs to know about
/// the current line kept up to date as it grows (never found by searching backwards).
struct Output {
    text: String,
    /// Where the current line starts.
    line_start: usize,
    /// True while the current line holds only spaces and tabs.
    line_blank: bool,
    /// True right after a line break: the writer's indentation is due before its next text on
    /// this line (and left out if the line stays empty).
    indent_due: bool,
    limit: usize,
}

impl Output {
    fn new(limit: usize) -> Output {
        Output {
            text: String::new(),
            line_start: 0,
            line_blank: true,
            indent_due: false,
            limit,
        }
    }

    /// Appends `text`, writing `indent` (a range of the output) before its non-empty lines after
    /// a line break.
    fn write(&mut self, text: &str, indent: &Range<usize>) -> Result<(), RenderError> {
        for (index, line) in text.split('\n').enumerate() {
            if index > 0 {
                self.make_room(1)?;
                self.text.push('\n');
                self.line_start = self.text.len();
                self.line_blank = true;
                self.indent_due = true;
            }
            if line.is_empty() {
                continue;
            }
            if self.indent_due {
                self.make_room(indent.len())?;
                // Indentation is made of spaces and tabs: the line stays blank.
                self.text.extend_from_within(indent.clone());
                self.indent_due = false;
            }
            self.make_room(line.len())?;
            self.line_blank = self.line_blank && line.bytes().all(|b| b == b' ' || b == b'\t');
            self.text.push_str(line);
        }
        Ok(())
    }

    /// Returns the indentation of a tag found now by a writer indenting with `indent`: the
    /// whitespace before it when the tag starts its line, else nothing.
    fn tag_indent(&self, indent: &Range<usize>) -> Range<usize> {
        if self.indent_due {
            indent.clone()
        } else if self.line_blank {
            self.line_start..self.text.len()
        } else {
            0..0
        }
    }

    /// Fails before the text would grow past the limit, so it never allocates much more.
    fn make_room(&self, additional: usize) -> Result<(), RenderError> {
        if self.text.len().saturating_add(additional) > self.limit {
            return Err(RenderError::TooLarge { limit: self.limit });
        }
        Ok(())
    }
}

/// Parses `<NAME/>` at the start of `text` (NAME: an upper-case letter, then upper-case letters,
/// digits and `_`); returns the name and the length of the tag. Reads only the name and the two
/// characters after it.
fn parse_tag(text: &str) -> Option<(&str, usize)> {
    let body = text.strip_prefix('<')?;
    if !body.starts_with(|c: char| c.is_ascii_uppercase()) {
        return None;
    }
    let end = body
        .find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
        .unwrap_or(body.len());
    body[end..]
        .starts_with("/>")
        .then_some((&body[..end], end + 3))
}

/// Parses `#{key}` at the start of `text` (key: ASCII letters, digits and `_`); returns the key
/// and the length of the variable. Reads only the key and the character after it.
fn parse_variable(text: &str) -> Option<(&str, usize)> {
    let body = text.strip_prefix("#{")?;
    let end = body
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(body.len());
    (end > 0 && body[end..].starts_with('}')).then_some((&body[..end], end + 3))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Plan;
    use vaas_proto::v1::VclVariable;

    fn plan() -> Plan {
        Plan {
            template_id: 1,
            syntax: "4.1",
            active: true,
            probes: vec![],
            backends: vec![],
            directors: vec![],
            routing: crate::routing::RoutingTable::build(&Default::default())
                .expect("an empty snapshot has an empty routing table"),
            version_label: None,
        }
    }

    fn block(id: i64, tag: &str, content: &str) -> VclTemplateBlock {
        VclTemplateBlock {
            id,
            template_id: 1,
            tag: tag.into(),
            content: content.into(),
        }
    }

    fn expand_all(
        template: &str,
        blocks: &[VclTemplateBlock],
        variables: &[VclVariable],
        limit: usize,
    ) -> Result<String, RenderError> {
        let blocks = Blocks::of_template(blocks, 1);
        let leaves = Leaves::new(&plan(), "v", &blocks);
        let variables = Variables::new(variables).expect("valid variables");
        expand_with_limit(template, &leaves, &blocks, &variables, limit)
    }

    fn expand_text(template: &str) -> String {
        expand_all(template, &[], &[], MAX_EXPANSION_BYTES).expect("expands")
    }

    #[test]
    fn known_variables_are_substituted() {
        assert_eq!(
            expand_text("a #{MESH_IP}:#{MESH_PORT} #{MESH_TIMEOUT_CONTROL_HEADER}"),
            "a 127.0.0.1:31001 x-service-mesh-timeout"
        );
    }

    #[test]
    fn unknown_and_unclosed_variables_are_left_alone() {
        assert_eq!(
            expand_text("#{NOPE} #{MESH_IP #{MESH_IP} #{} #{MESH-IP} ##{MESH_IP}} #{"),
            "#{NOPE} #{MESH_IP 127.0.0.1 #{} #{MESH-IP} #127.0.0.1} #{"
        );
    }

    #[test]
    fn tags_are_parsed() {
        assert_eq!(parse_tag("<VCL/>rest"), Some(("VCL", 6)));
        assert_eq!(parse_tag("<DIRECTOR_A1/>"), Some(("DIRECTOR_A1", 14)));
        assert_eq!(parse_tag("<vcl/>"), None);
        assert_eq!(parse_tag("< VCL/>"), None);
        assert_eq!(parse_tag("<VCL>"), None);
        assert_eq!(parse_tag("<VCL /> "), None);
        assert_eq!(parse_tag("<1A/>"), None);
        assert_eq!(parse_tag("<VCL/"), None);
        assert_eq!(parse_tag("<"), None);
    }

    #[test]
    fn variables_are_parsed() {
        assert_eq!(parse_variable("#{A_1}x"), Some(("A_1", 6)));
        assert_eq!(parse_variable("#{a}"), Some(("a", 4)));
        assert_eq!(parse_variable("#{}"), None);
        assert_eq!(parse_variable("#{A B}"), None);
        assert_eq!(parse_variable("#{A"), None);
        assert_eq!(parse_variable("#A}"), None);
    }

    #[test]
    fn indentation_follows_the_tag() {
        let blocks = [block(1, "ACL", "acl a {\n\n    \"x\";\n}")];
        assert_eq!(
            expand_all("sub x {\n    <ACL/>\n}", &blocks, &[], 1 << 20).expect("expands"),
            "sub x {\n    acl a {\n\n        \"x\";\n    }\n}"
        );
        // A tag after other text on its line adds no indentation.
        assert_eq!(
            expand_all("x = <ACL/>", &blocks, &[], 1 << 20).expect("expands"),
            "x = acl a {\n\n    \"x\";\n}"
        );
    }

    #[test]
    fn nested_indentation_adds_up_and_text_after_a_tag_follows_its_own_text() {
        let blocks = [
            block(1, "ACL", "a {\n  <HEADERS/>\n}\n"),
            block(2, "HEADERS", "h1\nh2"),
        ];
        assert_eq!(
            expand_all("  <ACL/>tail\n  end", &blocks, &[], 1 << 20).expect("expands"),
            // "tail" belongs to the template, which is not indented: only the block's lines
            // take the tag's indentation.
            "  a {\n    h1\n    h2\n  }\ntail\n  end"
        );
    }

    #[test]
    fn pathological_text_is_copied_unchanged() {
        for template in [
            "<".repeat(1 << 20),
            "<A".repeat(1 << 19),
            format!("<{}", "A".repeat(1 << 20)),
            "#{".repeat(1 << 19),
            "#{A".repeat(1 << 18),
            " ".repeat(1 << 20),
        ] {
            assert_eq!(expand_text(&template), template);
        }
    }

    #[test]
    fn output_beyond_the_limit_is_refused() {
        let template = "<HEADERS/>".repeat(100);
        let one = expand_text("<HEADERS/>").len();
        assert_eq!(
            expand_all(&template, &[], &[], one * 100).map(|text| text.len()),
            Ok(one * 100)
        );
        assert_eq!(
            expand_all(&template, &[], &[], one * 100 - 1),
            Err(RenderError::TooLarge {
                limit: one * 100 - 1
            })
        );
    }

    #[test]
    fn reading_beyond_the_limit_is_refused_even_when_nothing_is_written() {
        // The block writes nothing, yet reading it 1000 times costs 100 000 bytes.
        let blocks = [block(1, "ACL", &"#{EMPTY}".repeat(12) /* 96 bytes */)];
        let variables = [VclVariable {
            id: 1,
            cluster_id: 1,
            key: "EMPTY".into(),
            value: String::new(),
        }];
        let template = "<ACL/>".repeat(1000);
        assert_eq!(
            expand_all(&template, &blocks, &variables, 200_000),
            Ok(String::new())
        );
        assert_eq!(
            expand_all(&template, &blocks, &variables, 50_000),
            Err(RenderError::TooLarge { limit: 50_000 })
        );
    }
}
