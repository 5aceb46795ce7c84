//! Guards the linker: the components crate's `inventory` entries must reach the binary.

use registry::Slot;

#[test]
fn the_registry_holds_every_component() {
    let names: Vec<(Slot, &str)> = registry::entries()
        .unwrap()
        .into_iter()
        .map(|e| (e.slot, e.name))
        .collect();
    for expected in [
        (Slot::Attention, "Mha"),
        (Slot::Attention, "Gqa"),
        (Slot::Attention, "GatedGqa"),
        (Slot::Ffn, "Relu2"),
        (Slot::Optimizer, "Muon"),
        (Slot::Optimizer, "NorMuon"),
        (Slot::Schedule, "Trapezoid"),
        (Slot::Ffn, "Gelu"),
        (Slot::Ffn, "SwiGlu"),
        (Slot::Residual, "PreNorm"),
        (Slot::Residual, "Hc"),
        (Slot::Residual, "Mhc"),
        (Slot::Residual, "Laurel"),
        (Slot::Optimizer, "AdamW"),
        (Slot::Schedule, "Cosine"),
    ] {
        assert!(
            names.contains(&expected),
            "{expected:?} missing from {names:?}"
        );
    }
}
