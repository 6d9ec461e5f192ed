//! The scope catalogue's matching: comma-separated names as a grant, each
//! name as a required scope. A parsed grant round-trips through its names,
//! and a required scope is granted by a set that contains it.
#![no_main]

use std::sync::LazyLock;

use keywarden::keys::ScopeCatalogue;
use libfuzzer_sys::fuzz_target;

static CATALOGUE: LazyLock<ScopeCatalogue> = LazyLock::new(|| {
    let (defs, presets) = ScopeCatalogue::default_defs();
    ScopeCatalogue::new(defs, presets).expect("the default catalogue")
});

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let catalogue = &*CATALOGUE;
    let names: Vec<&str> = text.split(',').collect();
    if let Ok(granted) = catalogue.parse_grant(&names) {
        let listed = catalogue.names(granted);
        let again = catalogue.parse_grant(&listed).expect("listed names parse");
        assert_eq!(catalogue.names(again), listed);
        let expanded = catalogue.expand(granted);
        assert!(expanded.contains(granted));
        for name in &names {
            if let Some(required) = catalogue.required(name) {
                assert!(expanded.contains(required), "a granted scope is required-satisfied: {name}");
            }
        }
    }
    for name in &names {
        let _ = catalogue.required(name);
        let _ = catalogue.preset(name);
    }
});
