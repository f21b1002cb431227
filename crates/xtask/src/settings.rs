//! The settings table of docs/operations.md, checked against the services' own
//! command lines (their clap definitions): every environment variable a
//! service reads is in the table, every variable the table names is read by
//! the services it says, with the default the table gives. So the table cannot
//! drift from the code: a new setting without its row, a renamed one, or a
//! changed default fails `cargo xtask check-docs`.

use std::collections::BTreeMap;

use crate::docs::Problem;

/// Where the table is, and the heading it sits under.
pub const FILE: &str = "docs/operations.md";
const SECTION: &str = "## Configuration";
/// Read by the logging set-up, not by clap.
const NOT_CLAP: [&str; 2] = ["RUST_LOG", "RUST_LOG_FORMAT"];

/// One service's settings: environment variable → its default (empty when none).
pub type Settings = BTreeMap<String, String>;

/// The settings of the top-level command (not its subcommands) of `command`.
pub fn of(command: &clap::Command) -> Settings {
    command
        .get_arguments()
        .filter_map(|arg| {
            let env = arg.get_env()?.to_string_lossy().into_owned();
            let default = arg
                .get_default_values()
                .iter()
                .map(|value| value.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(",");
            Some((env, default))
        })
        .collect()
}

/// The services whose settings the table documents, by the names its "used
/// by" column uses.
pub fn services() -> Vec<(&'static str, Settings)> {
    vec![
        ("order-service", of(&<order_service::Config as clap::CommandFactory>::command())),
        ("inventory-consumer", of(&inventory_consumer::Config::command_line())),
    ]
}

/// A row of the table: its variables (one or more), their defaults and users.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Row {
    line: usize,
    names: Vec<String>,
    defaults: Vec<String>,
    used_by: Vec<String>,
}

/// The rows of the settings table in `markdown`.
fn rows(markdown: &str) -> Vec<Row> {
    let mut rows = Vec::new();
    let mut in_section = false;
    for (index, line) in markdown.lines().enumerate() {
        if line.starts_with("## ") {
            in_section = line.trim() == SECTION;
            continue;
        }
        if !in_section || !line.starts_with("| `") {
            continue;
        }
        let cells: Vec<&str> = line.trim_matches('|').split(" | ").map(str::trim).collect();
        if cells.len() < 3 {
            continue;
        }
        let split = |cell: &str| -> Vec<String> {
            cell.split(" / ").map(|part| part.trim().trim_matches('`').to_owned()).collect()
        };
        rows.push(Row {
            line: index + 1,
            names: split(cells[0]),
            // "unset": a setting with no default.
            defaults: split(cells[1])
                .into_iter()
                .map(|default| if default == "unset" { String::new() } else { default })
                .collect(),
            used_by: split(cells[2]),
        });
    }
    rows
}

/// The problems of the table in `markdown` against `services`.
pub fn check(markdown: &str, services: &[(&str, Settings)]) -> Vec<Problem> {
    let problem = |line: usize, what: String| Problem { file: FILE.to_owned(), line, what };
    let rows = rows(markdown);
    let mut problems = Vec::new();
    if rows.is_empty() {
        problems.push(problem(1, format!("no settings table under {SECTION:?}")));
        return problems;
    }
    for row in &rows {
        for (index, name) in row.names.iter().enumerate() {
            if NOT_CLAP.contains(&name.as_str()) {
                continue;
            }
            // "a / b" pairs defaults with names, or with the services using it.
            let users: Vec<&str> = match row.used_by.as_slice() {
                [one] if one == "both" || one == "all" => {
                    services.iter().map(|(service, _)| *service).collect()
                }
                users => users.iter().map(String::as_str).collect(),
            };
            for (position, user) in users.iter().enumerate() {
                let Some((_, settings)) = services.iter().find(|(service, _)| service == user)
                else {
                    problems.push(problem(row.line, format!("{name}: unknown service {user:?}")));
                    continue;
                };
                let Some(actual) = settings.get(name) else {
                    problems.push(problem(row.line, format!("{user} does not read {name}")));
                    continue;
                };
                let documented = if row.names.len() > 1 {
                    row.defaults.get(index)
                } else if row.defaults.len() > 1 {
                    row.defaults.get(position)
                } else {
                    row.defaults.first()
                };
                if documented.is_some_and(|documented| documented != actual) {
                    problems.push(problem(
                        row.line,
                        format!(
                            "{name}: the table says the default is {:?}, {user} has {actual:?}",
                            documented.map(String::as_str).unwrap_or_default()
                        ),
                    ));
                }
            }
        }
    }
    for (service, settings) in services {
        for name in settings.keys() {
            let documented = rows.iter().any(|row| {
                row.names.contains(name)
                    && (row
                        .used_by
                        .iter()
                        .any(|user| user == service || user == "both" || user == "all"))
            });
            if !documented {
                problems.push(problem(
                    1,
                    format!("{name} ({service}) is missing from the settings table"),
                ));
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "# Operations\n\n## Configuration\n\n\
        | variable | default | used by | meaning |\n|---|---|---|---|\n\
        | `DATABASE_URL` | `postgres://db` | both | Postgres |\n\
        | `LISTEN_ADDR` | `0.0.0.0:8080` / `0.0.0.0:8081` | a / b | HTTP |\n\
        | `BASE_MS` / `MAX_MS` | `1000` / `300000` | a | backoff |\n\
        | `RUST_LOG` | `info` | all | levels |\n\
        | `TOKEN` | unset | a | no default |\n\n## Metrics\n\n| `NOT_A_SETTING` | x | a | y |\n";

    fn services(extra: Option<(&str, &str)>) -> Vec<(&'static str, Settings)> {
        let mut a = Settings::from([
            ("DATABASE_URL".to_owned(), "postgres://db".to_owned()),
            ("LISTEN_ADDR".to_owned(), "0.0.0.0:8080".to_owned()),
            ("BASE_MS".to_owned(), "1000".to_owned()),
            ("MAX_MS".to_owned(), "300000".to_owned()),
            ("TOKEN".to_owned(), String::new()),
        ]);
        if let Some((name, default)) = extra {
            a.insert(name.to_owned(), default.to_owned());
        }
        let b = Settings::from([
            ("DATABASE_URL".to_owned(), "postgres://db".to_owned()),
            ("LISTEN_ADDR".to_owned(), "0.0.0.0:8081".to_owned()),
        ]);
        vec![("a", a), ("b", b)]
    }

    #[test]
    fn a_table_that_matches_the_code_passes() {
        assert_eq!(check(TABLE, &services(None)), []);
    }

    #[test]
    fn a_setting_without_its_row_fails() {
        let problems = check(TABLE, &services(Some(("NEW_SETTING", "5"))));
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].what.contains("NEW_SETTING (a) is missing"), "{problems:?}");
    }

    #[test]
    fn a_changed_default_and_a_setting_no_service_reads_fail() {
        let mut services = services(None);
        services[1].1.insert("LISTEN_ADDR".to_owned(), "0.0.0.0:9999".to_owned());
        services[0].1.remove("MAX_MS");
        let problems: Vec<String> =
            check(TABLE, &services).into_iter().map(|problem| problem.to_string()).collect();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems.iter().any(|p| p.contains(":8: LISTEN_ADDR") && p.contains("0.0.0.0:9999"))
        );
        assert!(problems.iter().any(|p| p.contains(":9: a does not read MAX_MS")));
    }

    #[test]
    fn the_real_table_matches_the_services() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let markdown = std::fs::read_to_string(root.join(FILE)).expect("the operations guide");
        let problems = check(&markdown, &super::services());
        assert!(
            problems.is_empty(),
            "{}",
            problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n")
        );
    }
}
