//! `#{key}` variables: the cluster's own values first, then the built-in defaults.

use std::collections::BTreeMap;

use vaas_proto::v1::VclVariable;

use crate::RenderError;

/// Built-in variables and their values, used when the cluster has no variable of that key.
const DEFAULT_VARIABLES: &[(&str, &str)] = &[
    ("MESH_IP", "127.0.0.1"),
    ("MESH_PORT", "31001"),
    ("MESH_TIMEOUT_CONTROL_HEADER", "x-service-mesh-timeout"),
];

/// The values `#{key}` stands for when rendering one cluster.
#[derive(Debug, Default)]
pub(crate) struct Variables<'a> {
    cluster: BTreeMap<&'a str, &'a str>,
}

impl<'a> Variables<'a> {
    /// Collects the cluster's variables, checking every value (used or not) again: the API
    /// refuses values that could change the VCL's structure, and so does the renderer, whatever
    /// reached the snapshot.
    pub(crate) fn new(variables: &'a [VclVariable]) -> Result<Variables<'a>, RenderError> {
        // The API keeps keys unique per cluster; should two arrive anyway, the lowest id wins,
        // so the output does not depend on the snapshot's order.
        let mut by_id: Vec<&VclVariable> = variables.iter().collect();
        by_id.sort_by_key(|variable| variable.id);
        let mut cluster = BTreeMap::new();
        for variable in by_id {
            check_value(variable)?;
            cluster
                .entry(variable.key.as_str())
                .or_insert(variable.value.as_str());
        }
        Ok(Variables { cluster })
    }

    /// Returns the value of `key`: the cluster's, else the built-in default, else `None`.
    pub(crate) fn get(&self, key: &str) -> Option<&'a str> {
        self.cluster.get(key).copied().or_else(|| {
            DEFAULT_VARIABLES
                .iter()
                .find(|(default_key, _)| *default_key == key)
                .map(|(_, value)| *value)
        })
    }
}

/// Refuses a value holding a control character (a line break included), `"`, `{`, `}`, `\` or
/// `;`: any of them could end a string, a long string `{"..."}`, a block or a statement that the
/// template opened around the variable.
fn check_value(variable: &VclVariable) -> Result<(), RenderError> {
    let forbidden = |c: char| c.is_control() || matches!(c, '"' | '{' | '}' | '\\' | ';');
    if variable.value.contains(forbidden) {
        return Err(RenderError::InvalidVariableValue {
            key: variable.key.clone(),
            value: variable.value.clone(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn variable(id: i64, key: &str, value: &str) -> VclVariable {
        VclVariable {
            id,
            cluster_id: 1,
            key: key.into(),
            value: value.into(),
        }
    }

    #[test]
    fn the_cluster_value_comes_before_the_default() {
        let own = [
            variable(1, "MESH_PORT", "8080"),
            variable(2, "TEAM", "edge"),
        ];
        let variables = Variables::new(&own).expect("valid");
        assert_eq!(variables.get("MESH_PORT"), Some("8080"));
        assert_eq!(variables.get("MESH_IP"), Some("127.0.0.1"));
        assert_eq!(variables.get("TEAM"), Some("edge"));
        assert_eq!(variables.get("team"), None);
        assert_eq!(variables.get("NOPE"), None);
    }

    #[test]
    fn duplicate_keys_resolve_to_the_lowest_id_whatever_the_order() {
        let mut own = vec![variable(7, "TEAM", "late"), variable(3, "TEAM", "early")];
        assert_eq!(
            Variables::new(&own).expect("valid").get("TEAM"),
            Some("early")
        );
        own.reverse();
        assert_eq!(
            Variables::new(&own).expect("valid").get("TEAM"),
            Some("early")
        );
    }

    #[test]
    fn values_that_could_change_the_structure_are_refused() {
        for value in [
            "a\"b", "a{b", "a}b", "a\\b", "a;b", "a\nb", "a\rb", "a\tb", "\u{0}", "\u{7f}",
            "\u{85}",
        ] {
            assert_eq!(
                Variables::new(&[variable(1, "X", value)]).expect_err(value),
                RenderError::InvalidVariableValue {
                    key: "X".into(),
                    value: value.into()
                }
            );
        }
        // Printable text, spaces and other punctuation are fine, and so is an empty value.
        for value in ["x-team", "10.0.0.1:8080", "a b/c*d", "caf\u{e9}", ""] {
            assert!(
                Variables::new(&[variable(1, "X", value)]).is_ok(),
                "{value:?}"
            );
        }
    }
}
