//! What template content may not do: read files or run code on a Varnish host.
//!
//! Templates and blocks are raw VCL by design, so their text is scanned like the VCL compiler
//! reads it — comments and strings skipped — for the constructs that reach outside the VCL:
//! `include` (reads a file, and the compiler echoes its first line in errors), `import … from`
//! (loads any shared object), inline C (`C{ … }C`), `std.fileread` (reads any file the cache
//! child can) and the `debug` and `vtc` test vmods (`vtc.panic()` …). The scan is one pass over the
//! text, linear in its length. A hardened varnishd (`vcc_unsafe_path=off`, `vcc_allow_inline_c`
//! read-only) is the second line of defence; this one names the line to the caller.
//!
//! The API checks template and block text before saving it; [`crate::render`] checks the whole
//! rendered VCL again, so that nothing assembled from allowed parts (a variable after `import`)
//! slips through.

/// One forbidden construct found in a text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Forbidden {
    /// The line it is on, counting from 1.
    pub line: usize,
    /// What it is and why it is refused.
    pub what: &'static str,
}

/// The vmods that exist for Varnish's own tests and can crash or stall the cache.
const TEST_VMODS: &[&str] = &["debug", "vtc"];

/// Returns every forbidden construct in `text`, in order.
pub fn forbidden_constructs(text: &str) -> Vec<Forbidden> {
    let words = words(text);
    let mut found = Vec::new();
    for (index, word) in words.iter().enumerate() {
        let next = words.get(index + 1).map(|next| next.text);
        let what = match word.text {
            "include" => Some("include reads a file on the Varnish host"),
            "C{" => Some("inline C runs code on the Varnish host"),
            "import" if next.is_some_and(|vmod| TEST_VMODS.contains(&vmod)) => {
                Some("the debug and vtc vmods are for Varnish's own tests")
            }
            "import" if next == Some("#{") => Some("the vmod imported must be written out"),
            "from" if index >= 2 && words[index - 2].text == "import" => {
                Some("import … from loads a file from any path")
            }
            text if text.eq_ignore_ascii_case("std.fileread") => {
                Some("std.fileread reads a file on the Varnish host")
            }
            text if TEST_VMODS.iter().any(|vmod| {
                text.strip_prefix(vmod)
                    .is_some_and(|rest| rest.starts_with('.'))
            }) =>
            {
                Some("the debug and vtc vmods are for Varnish's own tests")
            }
            _ => None,
        };
        if let Some(what) = what {
            found.push(Forbidden {
                line: word.line,
                what,
            });
        }
    }
    found
}

/// A word of VCL outside comments and strings: an identifier with dots, or `C{`.
#[derive(Debug)]
struct Word<'a> {
    text: &'a str,
    line: usize,
}

/// Splits `text` into words, skipping comments (`#`, `//`, `/* */`) and strings (`"…"`,
/// `{"…"}`); one pass, so linear in the length of the text.
fn words(text: &str) -> Vec<Word<'_>> {
    let bytes = text.as_bytes();
    let mut words = Vec::new();
    let mut line = 1;
    let mut at = 0;
    let skip_to = |from: usize, end: &[u8], line: &mut usize| -> usize {
        let mut at = from;
        while at < bytes.len() {
            if bytes[at..].starts_with(end) {
                return at + end.len();
            }
            if bytes[at] == b'\n' {
                *line += 1;
            }
            at += 1;
        }
        at
    };
    let end_of_line = |from: usize| {
        bytes[from..]
            .iter()
            .position(|&byte| byte == b'\n')
            .map_or(bytes.len(), |offset| from + offset)
    };
    while at < bytes.len() {
        let rest = &bytes[at..];
        match bytes[at] {
            b'\n' => {
                line += 1;
                at += 1;
            }
            // `#{key}` is a variable, written over by its value before varnishd sees it: the
            // text after it on the line is VCL, not a comment.
            b'#' if rest.starts_with(b"#{") => {
                words.push(Word { text: "#{", line });
                at += 2;
            }
            // A line comment ends before its newline, which the next round counts.
            b'#' => at = end_of_line(at),
            b'/' if rest.starts_with(b"//") => at = end_of_line(at),
            b'/' if rest.starts_with(b"/*") => at = skip_to(at + 2, b"*/", &mut line),
            b'{' if rest.starts_with(b"{\"") => at = skip_to(at + 2, b"\"}", &mut line),
            b'"' => at = skip_to(at + 1, b"\"", &mut line),
            b'C' if rest.starts_with(b"C{") => {
                words.push(Word { text: "C{", line });
                at += 2;
            }
            byte if byte.is_ascii_alphabetic() || byte == b'_' => {
                let start = at;
                while at < bytes.len()
                    && (bytes[at].is_ascii_alphanumeric()
                        || matches!(bytes[at], b'_' | b'.' | b'-'))
                {
                    at += 1;
                }
                words.push(Word {
                    text: &text[start..at],
                    line,
                });
            }
            _ => at += 1,
        }
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Vec<usize> {
        forbidden_constructs(text)
            .into_iter()
            .map(|found| found.line)
            .collect()
    }

    #[test]
    fn every_construct_that_leaves_the_vcl_is_found_with_its_line() {
        let template = "vcl 4.1;\n\
            include \"/etc/varnish/secret\";\n\
            import std;\n\
            import evil from \"/tmp/evil.so\";\n\
            import vtc;\n\
            sub vcl_recv {\n\
            \x20   set req.http.x = std.fileread(\"/etc/passwd\");\n\
            \x20   C{ system(\"id\"); }C\n\
            \x20   debug.panic(\"x\");\n\
            }\n";
        assert_eq!(lines(template), [2, 4, 5, 7, 8, 9]);
    }

    #[test]
    fn comments_strings_and_ordinary_vcl_are_fine() {
        let template = "<VCL/>\n\
            # include \"/etc/passwd\" is only a comment\n\
            // C{ also }C\n\
            /* import x from \"/y\"; */\n\
            sub vcl_deliver {\n\
            \x20   set resp.http.X-Note = \"include std.fileread C{\";\n\
            \x20   set resp.http.X-Long = {\"import vtc; include\"};\n\
            \x20   set resp.http.X-Included = \"yes\";\n\
            \x20   std.log(\"ok\");\n\
            }\n";
        assert_eq!(lines(template), Vec::<usize>::new());
    }

    #[test]
    fn a_variable_does_not_hide_the_rest_of_its_line() {
        assert_eq!(
            lines("set req.http.x = \"#{A}\"; #{B} include \"/x\";"),
            [1]
        );
        assert_eq!(lines("import #{VMOD};"), [1]);
    }

    #[test]
    fn an_unterminated_comment_or_string_ends_the_scan_without_looping() {
        assert_eq!(lines("/* never closed include"), Vec::<usize>::new());
        assert_eq!(lines("\"never closed\ninclude"), Vec::<usize>::new());
        assert_eq!(lines(&"<".repeat(1 << 20)), Vec::<usize>::new());
    }
}
