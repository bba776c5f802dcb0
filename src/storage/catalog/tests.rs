//! Unit tests of the catalog module.
use super::*;

fn open(dir: &std::path::Path) -> Catalog {
    Catalog::load(sled_at(dir), Io::default()).expect("load")
}

/// The catalog's sled database, opened as the engine opens it: sled lets go of its lock
/// asynchronously, so a handle dropped a moment ago may still hold it.
fn sled_at(dir: &std::path::Path) -> sled::Db {
    crate::storage::open::open_sled(dir).expect("sled")
}

fn add_table(c: &Catalog, db: &Arc<Database>, name: &str) -> Arc<Table> {
    let table = Arc::new(Table::new(
        c.allocate_id(),
        db.name.clone(),
        name.into(),
        TableSchema::new(vec![ColumnDef {
            name: "host".into(),
            kind: ColumnKind::Tag,
        }]),
    ));
    c.save_table(db, &table).expect("save");
    table
}

#[test]
fn databases_tables_and_views_survive_a_reload() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let c = open(dir.path());
        let db = c.ensure_database("main").expect("db");
        let t = add_table(&c, &db, "cpu, the \"first\"");
        t.settings.write().retention = Some(60);
        c.save_table(&db, &t).expect("save");
        c.save_view(&db, "v", b"{}").expect("view");
        c.store_next_seq(42).expect("seq");
        c.flush().expect("flush");
    }
    let c = open(dir.path());
    let t = c.table("main", "cpu, the \"first\"").expect("table");
    assert_eq!(t.settings.read().retention, Some(60));
    assert!(t.schema().column("host").is_some());
    assert!(
        t.schema().column(TIME_COLUMN).is_some(),
        "time is always there"
    );
    assert_eq!(c.views().expect("views").len(), 1);
    assert_eq!(c.stored_next_seq().expect("seq"), 42);
}

#[test]
fn ids_are_never_given_out_twice_even_after_a_drop_and_a_reload() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dropped = {
        let c = open(dir.path());
        let db = c.ensure_database("main").expect("db");
        add_table(&c, &db, "a");
        let last = add_table(&c, &db, "b");
        c.drop_table(&db, "b").expect("drop");
        c.flush().expect("flush");
        last.id
    };
    let c = open(dir.path());
    assert!(c.table("main", "b").is_none());
    assert!(c.allocate_id() > dropped);
}

#[test]
fn another_catalog_version_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let c = open(dir.path());
        c.tree.insert("meta/format", "7").expect("insert");
        c.flush().expect("flush");
    }
    let err = Catalog::load(sled_at(dir.path()), Io::default()).expect_err("version 7");
    assert!(
        matches!(err, CatalogError::Version { found: 7, .. }),
        "{err}"
    );
}

#[test]
fn name_rules() {
    assert!(check_name("température, 日本 / .. %41").is_ok());
    assert_eq!(check_name(""), Err(NameError::Empty));
    assert_eq!(
        check_name(&"x".repeat(MAX_NAME_BYTES + 1)),
        Err(NameError::TooLong {
            len: MAX_NAME_BYTES + 1
        })
    );
    assert_eq!(check_name("a\nb"), Err(NameError::Control('\n')));
    assert!(check_database_name("Main-2_x").is_ok());
    assert!(matches!(
        check_database_name("my db"),
        Err(NameError::DatabaseCharacters(_))
    ));
    assert!(matches!(
        check_database_name(&"d".repeat(65)),
        Err(NameError::DatabaseLength(_))
    ));
}
