//! Every CUDA kernel file compiles with NVRTC for sm_90 (the H100/H200 architecture), ptxas
//! included, so syntax, register and shared-memory errors, and spills, show up without a GPU. Without NVRTC
//! the test reports a skip, unless BFT_REQUIRE_NVRTC=1 (CI sets it, with NVRTC 13.0 from PyPI
//! on LD_LIBRARY_PATH), where a missing NVRTC fails.

use bft_kernels::cuda::{ALL, compile, nvrtc_available};

#[test]
fn every_cuda_kernel_compiles_for_sm_90() {
    if !nvrtc_available() {
        assert!(
            !std::env::var("BFT_REQUIRE_NVRTC").is_ok_and(|v| v == "1"),
            "BFT_REQUIRE_NVRTC=1 but libnvrtc was not found on LD_LIBRARY_PATH"
        );
        return eprintln!("skipped: NVRTC not found");
    }
    for src in ALL {
        let out = compile(src, "sm_90").unwrap_or_else(|e| panic!("{e}"));
        assert!(!out.cubin.is_empty(), "{}: empty CUBIN", src.name);
        // A CUBIN is an ELF file; each entry point is a symbol in it.
        assert_eq!(&out.cubin[..4], b"\x7fELF", "{}", src.name);
        for entry in src.entries {
            assert!(
                out.cubin
                    .windows(entry.len() + 1)
                    .any(|w| &w[..entry.len()] == entry.as_bytes() && w[entry.len()] == 0),
                "{}: entry point {entry} missing from the CUBIN",
                src.name
            );
        }
        // ptxas' report (`-v`): registers per thread, and no function may spill to local memory.
        let spills: Vec<&str> = out
            .log
            .lines()
            .filter(|l| l.contains("spill stores") && !l.contains(" 0 bytes spill stores"))
            .collect();
        assert!(spills.is_empty(), "{}: {spills:?}\n{}", src.name, out.log);
        let mut function = "";
        let mut registers = Vec::new();
        for line in out.log.lines() {
            if let Some(rest) = line.split("Compiling entry function '").nth(1) {
                function = rest.split('\'').next().unwrap_or("");
            } else if let Some(used) = line.split("Used ").nth(1) {
                registers.push(format!("{function}: {used}"));
            }
        }
        eprintln!(
            "{}: {} bytes of sm_90 code; {}",
            src.name,
            out.cubin.len(),
            registers.join("; ")
        );
    }
}
