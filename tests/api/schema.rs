//! The schema each release leaves, committed per backend (`schema/*.sql`),
//! and the rule that keeps rolling upgrades safe: a migration may only
//! expand it. The previous release keeps running against the new schema
//! while replicas roll, so dropping or renaming a table or column, changing
//! a column's type, or adding NOT NULL without a default would break it.
//! Such a change passes only as a contract step: the committed schema marks
//! the column `-- unused` (a release that no longer reads it shipped
//! first), and the migration that drops it says `// contract: table.column`.
//!
//! After a migration changes the schema, regenerate the files with
//! `KEYWARDEN_BLESS_SCHEMA=1 cargo test --locked --test api schema::`; a
//! breaking change is refused then too.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use keywarden::store::Store;
use sea_orm::{ConnectionTrait, Database, Statement};

use crate::helpers::Backend;

backend_tests!(the_committed_schema_is_what_the_migrations_leave);
once_tests!(
    only_expanding_changes_pass_without_a_contract_step,
    a_contract_step_drops_only_a_column_marked_unused,
);

#[derive(Debug, Clone, PartialEq, Eq)]
struct Column {
    /// Type, nullability and default, as the file writes them.
    shape: String,
    not_null: bool,
    has_default: bool,
    unused: bool,
}

/// A schema file read back: each table's columns, and the indexes.
#[derive(Debug, Default, PartialEq, Eq)]
struct Schema {
    tables: BTreeMap<String, BTreeMap<String, Column>>,
    indexes: BTreeSet<String>,
}

impl Schema {
    /// Parses the format [`Schema::render`] writes.
    fn parse(text: &str) -> Self {
        let mut schema = Self::default();
        let mut table = None;
        for line in text.lines() {
            if let Some(name) = line.strip_prefix("CREATE TABLE ").and_then(|l| l.strip_suffix(" (")) {
                table = Some(name.to_owned());
                schema.tables.entry(name.to_owned()).or_default();
            } else if line.starts_with(");") {
                table = None;
            } else if let (Some(table), Some(column)) = (&table, line.strip_prefix("    ")) {
                let (column, unused) = match column.split_once(" -- unused") {
                    Some((column, _)) => (column, true),
                    None => (column, false),
                };
                let column = column.trim_end_matches(',');
                let (name, shape) = column.split_once(' ').unwrap_or((column, ""));
                let columns = schema.tables.get_mut(table).expect("the table was opened");
                columns.insert(
                    name.to_owned(),
                    Column {
                        shape: shape.to_owned(),
                        not_null: shape.contains("NOT NULL"),
                        has_default: shape.contains("DEFAULT"),
                        unused,
                    },
                );
            } else if line.starts_with("CREATE ") && line.contains("INDEX ") {
                schema.indexes.insert(line.trim_end_matches(';').to_owned());
            }
        }
        schema
    }

    fn render(&self) -> String {
        let mut out = String::from(
            "-- The schema the migrations leave (tests/api/schema.rs): regenerate with\n\
             -- KEYWARDEN_BLESS_SCHEMA=1 cargo test --locked --test api schema::\n",
        );
        for (table, columns) in &self.tables {
            out.push_str(&format!("\nCREATE TABLE {table} (\n"));
            let last = columns.len().saturating_sub(1);
            for (i, (name, column)) in columns.iter().enumerate() {
                let comma = if i < last { "," } else { "" };
                let unused = if column.unused { " -- unused" } else { "" };
                out.push_str(&format!("    {name} {}{comma}{unused}\n", column.shape));
            }
            out.push_str(");\n");
        }
        out.push('\n');
        for index in &self.indexes {
            out.push_str(&format!("{index};\n"));
        }
        out
    }

    /// Carries `-- unused` marks over from the committed schema.
    fn keep_marks(&mut self, committed: &Self) {
        for (table, columns) in &mut self.tables {
            for (name, column) in columns {
                column.unused =
                    committed.tables.get(table).and_then(|t| t.get(name)).is_some_and(|c| c.unused);
            }
        }
    }
}

/// What in going from `before` to `after` would break the release that
/// reads `before`, and is not a contract step `contracts` names
/// (`table.column`, or `table` for a whole table).
fn breaking(before: &Schema, after: &Schema, contracts: &BTreeSet<String>) -> Vec<String> {
    let mut found = Vec::new();
    let allowed = |what: &str, marked: bool| marked && contracts.contains(what);
    for (table, columns) in &before.tables {
        let Some(now) = after.tables.get(table) else {
            if !allowed(table, columns.values().all(|c| c.unused)) {
                found.push(format!("table {table} dropped or renamed"));
            }
            continue;
        };
        for (name, column) in columns {
            let what = format!("{table}.{name}");
            match now.get(name) {
                None if !allowed(&what, column.unused) => {
                    found.push(format!("column {what} dropped or renamed"))
                }
                // A new type, or a changed nullability (NOT NULL refuses the
                // release before's writes; NULL gives it rows it cannot
                // read); a new default alone is harmless.
                Some(c)
                    if (type_of(&c.shape) != type_of(&column.shape) || c.not_null != column.not_null)
                        && !allowed(&what, column.unused) =>
                {
                    found.push(format!("column {what} changed from `{}` to `{}`", column.shape, c.shape));
                }
                _ => {}
            }
        }
        for (name, column) in now {
            if !columns.contains_key(name) && column.not_null && !column.has_default {
                found.push(format!("column {table}.{name} added NOT NULL without a default"));
            }
        }
    }
    found
}

/// A column's type alone, without NOT NULL or DEFAULT.
fn type_of(shape: &str) -> &str {
    shape.split(" NOT NULL").next().unwrap_or_default().split(" DEFAULT").next().unwrap_or_default()
}

/// Contract steps the migrations name: `// contract: table.column`.
fn contract_steps() -> BTreeSet<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/store/migration");
    let mut steps = BTreeSet::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        for line in text.lines() {
            if let Some(step) = line.trim().strip_prefix("// contract:") {
                steps.extend(step.split(',').map(|s| s.trim().to_owned()));
            }
        }
    }
    steps
}

async fn rows(url: &str, sql: &str) -> Vec<sea_orm::QueryResult> {
    let db = Database::connect(url).await.unwrap();
    let rows = db.query_all_raw(Statement::from_string(db.get_database_backend(), sql)).await.unwrap();
    db.close().await.ok();
    rows
}

/// The schema a database holds, read from its catalogue.
async fn dump(backend: &Backend, url: &str) -> Schema {
    let mut schema = Schema::default();
    let text =
        |r: &sea_orm::QueryResult, c: &str| r.try_get::<Option<String>>("", c).unwrap().unwrap_or_default();
    match backend {
        Backend::Postgres(_) => {
            let columns = rows(
                url,
                "SELECT table_name::text AS t, column_name::text AS c, data_type::text AS ty, \
                 is_nullable::text AS n, column_default::text AS d FROM information_schema.columns \
                 WHERE table_schema = 'public' AND table_name <> 'seaql_migrations' \
                 ORDER BY table_name, ordinal_position",
            )
            .await;
            for r in columns {
                let (not_null, default) = (text(&r, "n") == "NO", text(&r, "d"));
                let mut shape = text(&r, "ty");
                if not_null {
                    shape.push_str(" NOT NULL");
                }
                if !default.is_empty() {
                    shape.push_str(&format!(" DEFAULT {default}"));
                }
                let column = Column { shape, not_null, has_default: !default.is_empty(), unused: false };
                schema.tables.entry(text(&r, "t")).or_default().insert(text(&r, "c"), column);
            }
            let indexes = rows(
                url,
                "SELECT indexdef AS i FROM pg_indexes WHERE schemaname = 'public' \
                 AND tablename <> 'seaql_migrations'",
            )
            .await;
            schema.indexes = indexes.iter().map(|r| text(r, "i")).collect();
        }
        Backend::Sqlite => {
            let tables = rows(
                url,
                "SELECT name AS t FROM sqlite_master WHERE type = 'table' \
                 AND name NOT LIKE 'sqlite_%' AND name <> 'seaql_migrations' ORDER BY name",
            )
            .await;
            for table in tables.iter().map(|r| text(r, "t")) {
                let columns = rows(
                    url,
                    &format!(
                        "SELECT name AS c, type AS ty, \"notnull\" AS n, dflt_value AS d \
                         FROM pragma_table_info('{table}') ORDER BY cid"
                    ),
                )
                .await;
                for r in columns {
                    let not_null = r.try_get::<i32>("", "n").unwrap() == 1;
                    let default = text(&r, "d");
                    let mut shape = text(&r, "ty").to_lowercase();
                    if not_null {
                        shape.push_str(" NOT NULL");
                    }
                    if !default.is_empty() {
                        shape.push_str(&format!(" DEFAULT {default}"));
                    }
                    let column = Column { shape, not_null, has_default: !default.is_empty(), unused: false };
                    schema.tables.entry(table.clone()).or_default().insert(text(&r, "c"), column);
                }
            }
            let indexes = rows(
                url,
                "SELECT sql AS i FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL \
                 AND tbl_name <> 'seaql_migrations'",
            )
            .await;
            schema.indexes = indexes
                .iter()
                .map(|r| text(r, "i").split_whitespace().collect::<Vec<_>>().join(" "))
                .collect();
        }
    }
    schema
}

fn committed_path(backend: &Backend) -> PathBuf {
    let name = match backend {
        Backend::Sqlite => "sqlite.sql",
        Backend::Postgres(_) => "postgres.sql",
    };
    Path::new(env!("CARGO_MANIFEST_DIR")).join("schema").join(name)
}

async fn the_committed_schema_is_what_the_migrations_leave(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let (url, database) = crate::helpers::fresh_database(&backend, dir.path()).await;
    let store = Store::connect(&url, &Default::default()).await.unwrap();
    store.migrate().await.unwrap();
    store.close().await;
    let mut now = dump(&backend, &url).await;
    crate::helpers::drop_database(database).await;

    let path = committed_path(&backend);
    let committed = Schema::parse(&std::fs::read_to_string(&path).unwrap_or_default());
    now.keep_marks(&committed);
    let broken = breaking(&committed, &now, &contract_steps());
    assert!(
        broken.is_empty(),
        "a migration breaks the release running on {}: {broken:#?}\n(a contract step needs the column marked \
         `-- unused` there first, and `// contract: table.column` in the migration)",
        path.display()
    );
    if std::env::var_os("KEYWARDEN_BLESS_SCHEMA").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, now.render()).unwrap();
        return;
    }
    assert!(
        committed == now,
        "{} is not the schema the migrations leave; regenerate it with \
         KEYWARDEN_BLESS_SCHEMA=1 cargo test --locked --test api schema:: and commit it:\n{}",
        path.display(),
        now.render()
    );
}

fn schema(text: &str) -> Schema {
    Schema::parse(text)
}

const BEFORE: &str =
    "CREATE TABLE api_keys (\n    id text NOT NULL,\n    name text NOT NULL,\n    note text -- unused\n);\n";

async fn only_expanding_changes_pass_without_a_contract_step() {
    let before = schema(BEFORE);
    let none = BTreeSet::new();
    let expanded = schema(
        "CREATE TABLE api_keys (\n    id text NOT NULL,\n    name text NOT NULL,\n    note text,\n    \
         label text,\n    weight bigint NOT NULL DEFAULT 1\n);\nCREATE TABLE key_labels (\n    id text NOT NULL\n);\n",
    );
    assert_eq!(breaking(&before, &expanded, &none), Vec::<String>::new());
    let cases: [(&str, &[&str]); 6] = [
        (
            "CREATE TABLE api_keys (\n    id text NOT NULL,\n    note text\n);\n",
            &["column api_keys.name dropped or renamed"],
        ),
        (
            "CREATE TABLE api_keys (\n    id text NOT NULL,\n    title text NOT NULL,\n    note text\n);\n",
            &[
                "column api_keys.name dropped or renamed",
                "column api_keys.title added NOT NULL without a default",
            ],
        ),
        (
            "CREATE TABLE api_keys (\n    id text NOT NULL,\n    name text NOT NULL,\n    note text NOT NULL\n);\n",
            &["column api_keys.note changed from `text` to `text NOT NULL`"],
        ),
        (
            "CREATE TABLE api_keys (\n    id bigint NOT NULL,\n    name text NOT NULL,\n    note text\n);\n",
            &["column api_keys.id changed from `text NOT NULL` to `bigint NOT NULL`"],
        ),
        (
            "CREATE TABLE api_keys (\n    id text NOT NULL,\n    name text NOT NULL,\n    note text,\n    \
             tier text NOT NULL\n);\n",
            &["column api_keys.tier added NOT NULL without a default"],
        ),
        ("CREATE TABLE keys (\n    id text NOT NULL\n);\n", &["table api_keys dropped or renamed"]),
    ];
    for (after, why) in cases {
        assert_eq!(breaking(&before, &schema(after), &none), why, "{after}");
    }
}

async fn a_contract_step_drops_only_a_column_marked_unused() {
    let before = schema(BEFORE);
    let dropped_note = schema("CREATE TABLE api_keys (\n    id text NOT NULL,\n    name text NOT NULL\n);\n");
    let step = BTreeSet::from(["api_keys.note".to_owned()]);
    assert_eq!(
        breaking(&before, &dropped_note, &BTreeSet::new()),
        ["column api_keys.note dropped or renamed"]
    );
    assert_eq!(breaking(&before, &dropped_note, &step), Vec::<String>::new(), "marked unused, and named");
    let dropped_name =
        schema("CREATE TABLE api_keys (\n    id text NOT NULL,\n    note text -- unused\n);\n");
    let step = BTreeSet::from(["api_keys.name".to_owned()]);
    assert_eq!(
        breaking(&before, &dropped_name, &step),
        ["column api_keys.name dropped or renamed"],
        "named, but still in use by the release before"
    );
    // The file round-trips, marks included.
    assert_eq!(Schema::parse(&before.render()), before);
}
