// The C ABI of libflowstep_sdpa.so: cuDNN 9 SDPA (through cudnn-frontend) forward and backward
// for flowstep's com.flowstep::FlashAttention / FlashAttentionGrad on the CUDA provider.
// src/runtime/cuda_attention.rs mirrors these declarations; FLOWSTEP_SDPA_ABI changes with them.
#pragma once
#include <stddef.h>
#include <stdint.h>

#define FLOWSTEP_SDPA_ABI 1

#ifdef __cplusplus
extern "C" {
#endif

enum { FLOWSTEP_SDPA_FORWARD = 0, FLOWSTEP_SDPA_BACKWARD = 1 };
enum { FLOWSTEP_SDPA_BF16 = 0, FLOWSTEP_SDPA_FP16 = 1 };

// One attention graph. Dims in cuDNN's order [B, H, S, D]; strides (in elements) describe where
// those elements are in memory, so Wan's [B, S, H, D] tensors are used as they are. o, do and dq
// share q's strides; dk and dv share k's (= v's). lse is [B, H, Sq, 1] float32.
typedef struct {
    int32_t direction;
    int32_t dtype;
    int64_t b, h, sq, sk, d;
    float scale;
    int64_t q_strides[4];
    int64_t kv_strides[4];
    int64_t lse_strides[4];
} flowstep_sdpa_desc;

int32_t flowstep_sdpa_abi(void);

// Builds the graph and its execution plan on this handle's device; the plan lives as long as
// the process (flowstep keeps one per shape). Returns 0, or nonzero with a one-line reason in err.
int32_t flowstep_sdpa_build(const flowstep_sdpa_desc *desc, void *cudnn_handle, void **plan, int64_t *workspace_bytes,
                            char *err, size_t err_len);

// Enqueues the plan on stream (cudnnSetStream on the handle first). tensors in the operators'
// order: forward q, k, v, o, lse; backward q, k, v, o, lse, do, dq, dk, dv. Nothing synchronises.
int32_t flowstep_sdpa_run(void *plan, void *cudnn_handle, void *stream, void *const *tensors, void *workspace, char *err,
                          size_t err_len);

#ifdef __cplusplus
}
#endif
