//! With `--features cuda-attention`: compiles csrc/flowstep_sdpa.cpp (cuDNN 9 SDPA through the
//! header-only cudnn-frontend) into libflowstep_sdpa.so with the system C++ compiler. No nvcc,
//! no CUDA toolkit and nothing CUDA to link: the headers come from PyPI wheels
//! (scripts/setup_cuda_headers.sh), and the shim dlopens cuDNN at run time. Without the feature
//! this does nothing.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA_ATTENTION").is_none() {
        return;
    }
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let headers = std::env::var_os("FLOWSTEP_CUDA_HEADERS").map(PathBuf::from).unwrap_or_else(|| root.join(".cuda"));
    let include = headers.join("include");
    for var in ["FLOWSTEP_CUDA_HEADERS", "CXX"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    for file in ["csrc/flowstep_sdpa.cpp", "csrc/flowstep_sdpa.h"] {
        println!("cargo:rerun-if-changed={}", root.join(file).display());
    }
    println!("cargo:rerun-if-changed={}", headers.join("VERSION").display());
    if !include.join("cudnn_frontend.h").is_file() || !include.join("cudnn.h").is_file() {
        fail(&format!(
            "--features cuda-attention needs the cuDNN / cudnn-frontend / CUDA runtime headers in {}: run scripts/setup_cuda_headers.sh (or set FLOWSTEP_CUDA_HEADERS)",
            include.display()
        ));
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let lib = out.join("libflowstep_sdpa.so");
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".into());
    let status = Command::new(&cxx)
        .args(["-std=c++17", "-O2", "-fPIC", "-shared", "-Wall", "-Wextra", "-Werror", "-DNV_CUDNN_FRONTEND_USE_DYNAMIC_LOADING"])
        .arg("-isystem")
        .arg(&include)
        .arg(root.join("csrc/flowstep_sdpa.cpp"))
        .arg("-o")
        .arg(&lib)
        .args(["-Wl,-soname,libflowstep_sdpa.so", "-ldl"])
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => fail(&format!("{cxx} failed ({s}) compiling csrc/flowstep_sdpa.cpp")),
        Err(e) => fail(&format!("cannot run the C++ compiler `{cxx}` for csrc/flowstep_sdpa.cpp: {e}")),
    }
    // Next to the flowstep binary (target/<profile>/), where the runtime looks first; the build
    // path is compiled in as the last resort (tests run from target/<profile>/deps/).
    if let Some(profile_dir) = out.ancestors().nth(3)
        && let Err(e) = std::fs::copy(&lib, profile_dir.join("libflowstep_sdpa.so"))
    {
        println!("cargo:warning=libflowstep_sdpa.so not copied to {}: {e}", profile_dir.display());
    }
    println!("cargo:rustc-env=FLOWSTEP_SDPA_BUILT={}", lib.display());
}

fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    std::process::exit(1);
}
