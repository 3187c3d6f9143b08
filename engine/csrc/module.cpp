// The Python module engine._cpu_kernels: see engine/ops/cpu_native.py for what each op is for.

#include <torch/extension.h>

void paged_decode_attention(torch::Tensor out, torch::Tensor query, torch::Tensor key_cache,
                            torch::Tensor value_cache, torch::Tensor block_tables, torch::Tensor seq_lens,
                            double scale);
void paged_prefill_attention(torch::Tensor out, torch::Tensor query, torch::Tensor key_cache,
                             torch::Tensor value_cache, torch::Tensor block_tables, torch::Tensor query_start_loc,
                             torch::Tensor seq_lens, double scale);
void write_kv_cache(torch::Tensor key, torch::Tensor value, torch::Tensor key_cache, torch::Tensor value_cache,
                    torch::Tensor slot_mapping);
void rms_norm(torch::Tensor out, torch::Tensor x, c10::optional<torch::Tensor> add, torch::Tensor weight,
              double eps);
void silu_and_mul(torch::Tensor out, torch::Tensor gate_up);
void rotary_(torch::Tensor x, torch::Tensor cos, torch::Tensor sin_signed);
void argmax_rows(torch::Tensor out, torch::Tensor logits);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CPU kernels over the paged KV cache (see engine/ops/cpu_native.py)";
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention reading pages in place");
  m.def("paged_prefill_attention", &paged_prefill_attention,
        "causal attention of prefill chunks over their cached prefix and themselves, reading pages in place");
  m.def("write_kv_cache", &write_kv_cache, "write new tokens' K/V into their cache slots");
  m.def("rms_norm", &rms_norm, "RMSNorm of rows, optionally after adding into them in place");
  m.def("silu_and_mul", &silu_and_mul, "silu(gate) * up of a fused gate_up projection");
  m.def("rotary_", &rotary_, "rotary embedding in place");
  m.def("argmax_rows", &argmax_rows, "index of each row's first maximum (NaN counts as the maximum)");
}
