#!/usr/bin/env bash
# Regenerates export/flowstep_export/pipeline/cuda_kernels_ort-1.31.1.json from the onnxruntime-gpu
# 1.31.1 wheel itself (its get_all_opkernel_def(), the source of ONNX Runtime's OperatorKernels.md).
# Works without a GPU or CUDA: the provider library is linked against no-op stand-ins for the CUDA
# libraries it needs (cudart, cuBLAS, cuBLASLt, cuRAND, the driver; and cuDNN/TensorRT for the
# TensorRT provider, which the same call creates). Listing kernels runs the provider's registration
# code only; no CUDA call has to do real work. With real CUDA libraries present, set NO_STUBS=1.
# Usage: scripts/cuda_kernel_registry.sh [path/to/onnxruntime_gpu-1.31.1-*.whl] [OUT.json]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
wheel="${1:-$(ls "${FLOWSTEP_CACHE:-$HOME/.cache/flowstep}"/wheels/onnxruntime_gpu-1.31.1-*.whl | head -1)}"
out="${2:-$root/export/flowstep_export/pipeline/cuda_kernels_ort-1.31.1.json}"
venv="$("$root/scripts/setup_python.sh")"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
unzip -q "$wheel" 'onnxruntime/*' -d "$work/site"
capi="$work/site/onnxruntime/capi"
libs=""
if [[ "${NO_STUBS:-0}" != 1 ]]; then
    mkdir -p "$work/stubs" && cd "$work/stubs"
    # Every function the providers import from a CUDA/TensorRT library returns 0 (success); the few
    # whose out-parameters the provider constructors read get plausible values.
    cat > special.c <<'C'
#include <stdlib.h>
static char dummy[4096];
static void* dummyp[64];
int cudaGetDeviceCount(int* n){ *n=1; return 0; }
int cudaGetDevice(int* d){ *d=0; return 0; }
int cudaDriverGetVersion(int* v){ *v=13000; return 0; }
int cudaRuntimeGetVersion(int* v){ *v=13000; return 0; }
int cudaDeviceGetAttribute(int* v, int a, int d){ *v=0; return 0; }
const char* cudaGetErrorString(int e){ return "cuda stub"; }
const char* cudaGetErrorName(int e){ return "cudaStub"; }
int cudaMalloc(void** p, size_t n){ *p=malloc(n?n:1); return 0; }
int cudaMallocHost(void** p, size_t n){ *p=malloc(n?n:1); return 0; }
int cudaHostAlloc(void** p, size_t n, unsigned f){ *p=malloc(n?n:1); return 0; }
int cudaMemGetInfo(size_t* f, size_t* t){ *f=1ull<<34; *t=1ull<<34; return 0; }
int cudaStreamCreate(void** s){ *s=dummy; return 0; }
int cudaStreamCreateWithFlags(void** s, unsigned f){ *s=dummy; return 0; }
int cudaEventCreate(void** s){ *s=dummy; return 0; }
int cudaEventCreateWithFlags(void** s, unsigned f){ *s=dummy; return 0; }
void** __cudaRegisterFatBinary(void* fb){ return dummyp; }
int cudaGetDeviceProperties(void* p, int d){ return 0; }
int cudaGetDriverEntryPointByVersion(const char* s, void** f, unsigned v, unsigned long long fl, int* st){ *f=0; if(st)*st=0; return 0; }
const char* cublasGetStatusString(int s){ return "cublas stub"; }
const char* cublasGetStatusName(int s){ return "CUBLAS_STUB"; }
int cublasCreate_v2(void** h){ *h=dummy; return 0; }
int cublasLtCreate(void** h){ *h=dummy; return 0; }
C
    special="$(grep -oE '[_a-zA-Z0-9]+\(' special.c | tr -d '(' | sort -u)"
    und() { for so in "$capi"/libonnxruntime_providers_{cuda,tensorrt}.so; do
                readelf --dyn-syms -W "$so" | awk '$7=="UND"{print $8}'; done | sort -u; }
    und > und.txt
    for lib in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcudnn.so.9; do
        { cat special.c
          grep "@$lib\$" und.txt | sed 's/@.*//' | grep -vxF "$special" | sed 's/.*/int &(void){ return 0; }/'
        } > "$lib.c"
        echo "$lib { global: *; };" > "$lib.map"
        gcc -shared -fPIC -o "$lib" "$lib.c" -Wl,--version-script="$lib.map" -Wl,-soname,"$lib"
    done
    trt="$(readelf --dyn-syms -W "$capi/libonnxruntime_providers_tensorrt.so" | awk '$7=="UND"{print $8}' \
           | grep -vE '@|^$|_ITM_|__gmon_start__|__gcov|Provider_GetHost' || true)"
    echo "$trt" | grep -i parser | sed 's/.*/void* &(void){ return 0; }/' > nvonnxparser.c
    echo "$trt" | grep -vi parser | sed 's/.*/void* &(void){ return 0; }/' > nvinfer.c
    echo 'int cuTensorMapEncodeTiled(void){ return 0; }' > cuda.c
    echo 'int curand_stub(void){ return 0; }' > curand.c
    for pair in nvonnxparser:libnvonnxparser.so.10 nvinfer:libnvinfer.so.10 cuda:libcuda.so.1 curand:libcurand.so.10; do
        gcc -shared -fPIC -o "${pair#*:}" "${pair%%:*}.c" -Wl,-soname,"${pair#*:}"
    done
    libs="$work/stubs"
    cd "$root"
fi
cd "$root/export"
LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" PYTHONPATH="$work/site:$root/export" \
    "$venv/bin/python" -m flowstep_export.pipeline.cuda_kernels "$out"
