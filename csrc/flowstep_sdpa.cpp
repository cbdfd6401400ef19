// cuDNN 9 SDPA forward/backward for flowstep's fused attention operators (flowstep_sdpa.h).
// Plain C++17 over the header-only cudnn-frontend: no device code, no nvcc. Built with
// NV_CUDNN_FRONTEND_USE_DYNAMIC_LOADING, so cuDNN and the CUDA runtime are dlopen'ed by soname
// (libcudnn.so.9, libcudart.so.13) on first use: the ones ONNX Runtime's CUDA provider already
// loaded, one cuDNN instance for both; nothing CUDA is needed to link. The graph for one
// shape is built once (milliseconds to ~100 ms) and reused; the Rust side caches plans by shape.
#include "flowstep_sdpa.h"

#include <cudnn_frontend.h>

#include <cstddef>
#include <cstdio>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <dlfcn.h>

namespace fe = cudnn_frontend;

// cudnn-frontend's dynamic loading resolves every cuDNN call through this handle.
void *cudnn_frontend::cudnn_dlhandle = nullptr;

// The layout src/runtime/cuda_attention.rs mirrors (its test checks the same numbers).
static_assert(sizeof(flowstep_sdpa_desc) == 152, "flowstep_sdpa_desc size");
static_assert(offsetof(flowstep_sdpa_desc, scale) == 48, "flowstep_sdpa_desc.scale");
static_assert(offsetof(flowstep_sdpa_desc, q_strides) == 56, "flowstep_sdpa_desc.q_strides");
static_assert(offsetof(flowstep_sdpa_desc, lse_strides) == 120, "flowstep_sdpa_desc.lse_strides");

namespace {

constexpr const char *CUDNN_LIBRARY = "libcudnn.so.9";

// Tensor uids in the variant pack: the operators' input/output order (flowstep_sdpa_run).
enum Uid : int64_t { Q = 1, K, V, O, LSE, DO, DQ, DK, DV };

struct Plan {
    int32_t direction;
    std::shared_ptr<fe::graph::Graph> graph;
};

void set_err(char *err, size_t len, const std::string &msg) {
    if (err && len) std::snprintf(err, len, "%s", msg.c_str());
}

std::vector<int64_t> dims(int64_t b, int64_t h, int64_t s, int64_t d) { return {b, h, s, d}; }
std::vector<int64_t> strides(const int64_t (&s)[4]) { return {s[0], s[1], s[2], s[3]}; }

std::shared_ptr<fe::graph::Tensor_attributes> input(fe::graph::Graph &g, const char *name, Uid uid, std::vector<int64_t> dim,
                                                    std::vector<int64_t> stride) {
    return g.tensor(fe::graph::Tensor_attributes().set_name(name).set_uid(uid).set_dim(dim).set_stride(stride));
}

// The frontend graph for desc: bf16/fp16 in and out, float32 softmax statistics and accumulation.
std::shared_ptr<fe::graph::Graph> describe(const flowstep_sdpa_desc &d) {
    auto g = std::make_shared<fe::graph::Graph>();
    g->set_io_data_type(d.dtype == FLOWSTEP_SDPA_FP16 ? fe::DataType_t::HALF : fe::DataType_t::BFLOAT16)
        .set_intermediate_data_type(fe::DataType_t::FLOAT)
        .set_compute_data_type(fe::DataType_t::FLOAT);
    auto qd = dims(d.b, d.h, d.sq, d.d), kd = dims(d.b, d.h, d.sk, d.d), ld = dims(d.b, d.h, d.sq, 1);
    auto qs = strides(d.q_strides), ks = strides(d.kv_strides), ls = strides(d.lse_strides);
    auto q = input(*g, "q", Q, qd, qs), k = input(*g, "k", K, kd, ks), v = input(*g, "v", V, kd, ks);
    if (d.direction == FLOWSTEP_SDPA_FORWARD) {
        auto attrs = fe::graph::SDPA_attributes().set_name("flash_attention").set_generate_stats(true).set_attn_scale(d.scale);
        auto [o, lse] = g->sdpa(q, k, v, attrs);
        o->set_output(true).set_uid(O).set_dim(qd).set_stride(qs);
        lse->set_output(true).set_uid(LSE).set_data_type(fe::DataType_t::FLOAT).set_dim(ld).set_stride(ls);
    } else {
        auto o = input(*g, "o", O, qd, qs), d_o = input(*g, "do", DO, qd, qs);
        auto lse = g->tensor(fe::graph::Tensor_attributes()
                                 .set_name("lse")
                                 .set_uid(LSE)
                                 .set_dim(ld)
                                 .set_stride(ls)
                                 .set_data_type(fe::DataType_t::FLOAT));
        auto attrs = fe::graph::SDPA_backward_attributes().set_name("flash_attention_grad").set_attn_scale(d.scale);
        auto [dq, dk, dv] = g->sdpa_backward(q, k, v, o, d_o, lse, attrs);
        dq->set_output(true).set_uid(DQ).set_dim(qd).set_stride(qs);
        dk->set_output(true).set_uid(DK).set_dim(kd).set_stride(ks);
        dv->set_output(true).set_uid(DV).set_dim(kd).set_stride(ks);
    }
    return g;
}

// Opens cuDNN once (by soname: the copy the CUDA provider loaded, if it did).
bool load_cudnn(char *err, size_t len) {
    static std::once_flag once;
    std::call_once(once, [] { fe::cudnn_dlhandle = dlopen(CUDNN_LIBRARY, RTLD_NOW | RTLD_GLOBAL); });
    if (!fe::cudnn_dlhandle) {
        const char *why = dlerror();
        set_err(err, len, std::string("cannot load ") + CUDNN_LIBRARY + " (cuDNN 9, which the CUDA provider needs too; add its directory to LD_LIBRARY_PATH): " + (why ? why : "not found"));
        return false;
    }
    return true;
}

#define FLOWSTEP_TRY(step, what)                                                                 \
    do {                                                                                         \
        auto status_ = (step);                                                                   \
        if (!status_.is_good()) {                                                                \
            set_err(err, err_len, std::string("cuDNN SDPA ") + (what) + ": " + status_.get_message()); \
            return 1;                                                                            \
        }                                                                                        \
    } while (0)

}  // namespace

extern "C" int32_t flowstep_sdpa_abi(void) { return FLOWSTEP_SDPA_ABI; }

extern "C" int32_t flowstep_sdpa_build(const flowstep_sdpa_desc *desc, void *cudnn_handle, void **plan,
                                       int64_t *workspace_bytes, char *err, size_t err_len) {
    if (!load_cudnn(err, err_len)) return 1;
    try {
        auto handle = static_cast<cudnnHandle_t>(cudnn_handle);
        auto g = describe(*desc);
        FLOWSTEP_TRY(g->validate(), "validate");
        FLOWSTEP_TRY(g->build_operation_graph(handle), "build_operation_graph");
        FLOWSTEP_TRY(g->create_execution_plans({fe::HeurMode_t::A}), "create_execution_plans");
        FLOWSTEP_TRY(g->check_support(handle), "check_support");
        FLOWSTEP_TRY(g->build_plans(handle), "build_plans");
        FLOWSTEP_TRY(g->get_workspace_size(*workspace_bytes), "get_workspace_size");
        *plan = new Plan{desc->direction, g};
        return 0;
    } catch (const std::exception &e) {
        set_err(err, err_len, std::string("cuDNN SDPA build: ") + e.what());
        return 1;
    }
}

extern "C" int32_t flowstep_sdpa_run(void *plan, void *cudnn_handle, void *stream, void *const *tensors, void *workspace,
                                     char *err, size_t err_len) {
    try {
        auto *p = static_cast<Plan *>(plan);
        auto handle = static_cast<cudnnHandle_t>(cudnn_handle);
        auto status = fe::detail::set_stream(handle, static_cast<cudaStream_t>(stream));
        if (status != CUDNN_STATUS_SUCCESS) {
            set_err(err, err_len, std::string("cudnnSetStream: ") + fe::detail::get_error_string(status));
            return 1;
        }
        std::unordered_map<int64_t, void *> pack;
        const int64_t n = p->direction == FLOWSTEP_SDPA_FORWARD ? 5 : 9;
        for (int64_t i = 0; i < n; ++i) pack.emplace(Q + i, tensors[i]);
        FLOWSTEP_TRY(p->graph->execute(handle, pack, workspace), "execute");
        return 0;
    } catch (const std::exception &e) {
        set_err(err, err_len, std::string("cuDNN SDPA execute: ") + e.what());
        return 1;
    }
}
