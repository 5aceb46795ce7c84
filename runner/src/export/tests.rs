use candle_core::Device;

use super::*;

/// A resolved configuration as the DB stores it, with these components.
fn config(attention: &str, ffn: &str, residual: &str) -> String {
    format!(
        "(\n    seed: 0,\n    data: Text(path:([\"a.txt\"]),tokenizer:Gpt2,val_fraction:0.1),\n    \
         train: (steps:10,batch:2,seq_len:32),\n    model: (d_model:16,n_layers:2),\n    \
         attention: {attention},\n    ffn: {ffn},\n    residual: {residual},\n    \
         optimizer: AdamW(lr:0.001),\n    schedule: Cosine,\n)"
    )
}

/// The weights a model with `hidden` FFN channels has where ModelInfo looks.
fn weights(hidden: usize) -> BTreeMap<String, Tensor> {
    let d = Device::Cpu;
    BTreeMap::from([
        (
            "wte".into(),
            Tensor::zeros((50304, 16), DType::F32, &d).unwrap(),
        ),
        (
            "blocks.0.ffn.up.weight".into(),
            Tensor::zeros((hidden, 16), DType::F32, &d).unwrap(),
        ),
    ])
}

const GQA: &str = "Gqa(heads:4,kv_heads:2,rope:true,rope_theta:10000.0,qk_norm:false)";

fn info(attention: &str, ffn: &str, residual: &str) -> ModelInfo {
    ModelInfo::new(&config(attention, ffn, residual), &weights(40)).unwrap()
}

#[test]
fn a_stock_architecture_is_chosen_only_where_it_is_exactly_the_model() {
    let layout = |a: &str, f: &str, r: &str| info(a, f, r).layout();
    assert_eq!(layout(GQA, "SwiGlu(mult:2.6667)", "PreNorm"), Layout::Llama);
    let mha = "Mha(heads:4,rope:true,rope_theta:10000.0,qk_norm:false)";
    assert_eq!(layout(mha, "SwiGlu(mult:2.6667)", "PreNorm"), Layout::Llama);
    let qk = GQA.replace("qk_norm:false", "qk_norm:true");
    assert_eq!(layout(&qk, "SwiGlu(mult:2.6667)", "PreNorm"), Layout::Qwen3);
    // Anything Llama does not compute needs sweep's own code.
    let no_rope = GQA.replace("rope:true", "rope:false");
    assert_eq!(
        layout(&no_rope, "SwiGlu(mult:2.6667)", "PreNorm"),
        Layout::Sweep
    );
    assert_eq!(layout(GQA, "Gelu(mult:4.0)", "PreNorm"), Layout::Sweep);
    assert_eq!(layout(GQA, "Relu2(mult:4.0)", "PreNorm"), Layout::Sweep);
    assert_eq!(
        layout(
            GQA,
            "SwiGlu(mult:2.6667)",
            "Mhc(streams:4,sinkhorn_iters:20)"
        ),
        Layout::Sweep
    );
    assert_eq!(
        layout(GQA, "SwiGlu(mult:2.6667)", "Laurel(rank:8,rw:false)"),
        Layout::Sweep
    );
    let gated =
        "GatedGqa(heads:4,kv_heads:2,gate:Elementwise,rope:true,rope_theta:10000.0,qk_norm:false)";
    assert_eq!(
        layout(gated, "SwiGlu(mult:2.6667)", "PreNorm"),
        Layout::Sweep
    );
}

#[test]
fn weight_names_follow_transformers_llama() {
    // LlamaForCausalLM's state dict for one layer (modeling_llama.py), the head tied.
    let ours_and_theirs = [
        ("wte", "model.embed_tokens.weight"),
        (
            "blocks.0.attn_norm.gain",
            "model.layers.0.input_layernorm.weight",
        ),
        (
            "blocks.0.attn.q.weight",
            "model.layers.0.self_attn.q_proj.weight",
        ),
        (
            "blocks.0.attn.k.weight",
            "model.layers.0.self_attn.k_proj.weight",
        ),
        (
            "blocks.0.attn.v.weight",
            "model.layers.0.self_attn.v_proj.weight",
        ),
        (
            "blocks.0.attn.o.weight",
            "model.layers.0.self_attn.o_proj.weight",
        ),
        (
            "blocks.0.ffn_norm.gain",
            "model.layers.0.post_attention_layernorm.weight",
        ),
        (
            "blocks.11.ffn.gate.weight",
            "model.layers.11.mlp.gate_proj.weight",
        ),
        (
            "blocks.11.ffn.up.weight",
            "model.layers.11.mlp.up_proj.weight",
        ),
        (
            "blocks.11.ffn.down.weight",
            "model.layers.11.mlp.down_proj.weight",
        ),
        ("norm_f.gain", "model.norm.weight"),
    ];
    for (ours, theirs) in ours_and_theirs {
        assert_eq!(weight_name(ours, Layout::Llama), theirs);
        assert_eq!(weight_name(ours, Layout::Qwen3), theirs);
        assert_eq!(weight_name(ours, Layout::Sweep), ours);
    }
}

#[test]
fn qwen3_gets_unit_qk_norm_gains_and_the_config_states_the_shape() -> candle_core::Result<()> {
    let qk = GQA.replace("qk_norm:false", "qk_norm:true");
    let m = info(&qk, "SwiGlu(mult:2.6667)", "PreNorm");
    let out = super::weights(&m, Layout::Qwen3, Precision::Bf16, &weights(40))?;
    // Two layers x (q_norm, k_norm) of head_dim 16 / 4 = 4 ones, beside the renamed two.
    assert_eq!(out.len(), 2 + 4);
    let g = &out["model.layers.1.self_attn.k_norm.weight"];
    assert_eq!(g.dims(), [4]);
    assert_eq!(g.dtype(), DType::BF16);
    assert_eq!(g.to_dtype(DType::F32)?.to_vec1::<f32>()?, vec![1.0; 4]);
    assert_eq!(out["model.embed_tokens.weight"].dtype(), DType::BF16);

    let cfg = config_json(&m, Layout::Qwen3, Precision::Bf16, json!({"trial": "t"}));
    for (key, want) in [
        ("model_type", json!("qwen3")),
        ("hidden_size", json!(16)),
        ("intermediate_size", json!(40)),
        ("num_hidden_layers", json!(2)),
        ("num_attention_heads", json!(4)),
        ("num_key_value_heads", json!(2)),
        ("head_dim", json!(4)),
        ("vocab_size", json!(50304)),
        ("rms_norm_eps", json!(1e-6)),
        ("rope_theta", json!(10000.0)),
        ("tie_word_embeddings", json!(true)),
        ("eos_token_id", json!(50256)),
        ("torch_dtype", json!("bfloat16")),
    ] {
        assert_eq!(cfg[key], want, "{key}");
    }
    Ok(())
}

#[test]
fn sweeps_own_config_carries_every_component_parameter() {
    let gated =
        "GatedGqa(heads:4,kv_heads:2,gate:Headwise,rope:true,rope_theta:10000.0,qk_norm:false)";
    let m = info(gated, "Relu2(mult:4.0)", "Hc(streams:3,dynamic:true)");
    assert_eq!(m.kv_heads(), 2);
    let cfg = config_json(&m, Layout::Sweep, Precision::F32, json!({}));
    assert_eq!(cfg["model_type"], "sweep");
    assert_eq!(
        cfg["auto_map"]["AutoModelForCausalLM"],
        "modeling_sweep.SweepForCausalLM"
    );
    assert_eq!(
        cfg["attention"],
        json!({"kind": "GatedGqa", "heads": 4, "kv_heads": 2, "gate": "Headwise",
               "rope": true, "rope_theta": 10000.0, "qk_norm": false})
    );
    assert_eq!(
        cfg["ffn"],
        json!({"kind": "Relu2", "mult": 4.0, "hidden": 40})
    );
    assert_eq!(
        cfg["residual"],
        json!({"kind": "Hc", "streams": 3, "dynamic": true})
    );
    // Mha's key/value heads are its heads.
    let mha = info(
        "Mha(heads:4,rope:true,rope_theta:10000.0,qk_norm:false)",
        "Gelu(mult:4.0)",
        "PreNorm",
    );
    assert_eq!(mha.kv_heads(), 4);
}

#[test]
fn the_shipped_modeling_file_implements_every_registered_component() {
    // Each registered component's name is a kind the PyTorch code dispatches on.
    let reg = registry::registry().unwrap();
    for slot in [
        registry::Slot::Attention,
        registry::Slot::Ffn,
        registry::Slot::Residual,
    ] {
        for name in reg.names(slot) {
            assert!(
                MODELING_PY.contains(&format!("\"{name}\"")),
                "modeling_sweep.py does not handle {slot} {name}"
            );
        }
    }
}
