//! What this CPU's arithmetic units can do, read once from `cpuid`: the
//! instruction sets the frozen base's products and the precision choice
//! ([`crate::quantize::BaseDtype`]) are picked by at run time.
//!
//! AMX is read from `cpuid` directly (the standard library's detection of
//! it is not stable yet); the AVX-512 sets through `is_x86_feature_detected!`,
//! which also checks that the operating system saves their registers.

pub mod peak;

use std::sync::OnceLock;

/// The instruction sets of this CPU that matter for matmuls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuFeatures {
    /// 256-bit f32 fused multiply-add (AVX2 + FMA).
    pub avx2_fma: bool,
    /// 512-bit f32 (AVX-512 F).
    pub avx512f: bool,
    /// bf16 dot products into f32 on 512-bit registers (AVX512_BF16).
    pub avx512_bf16: bool,
    /// bf16 tile matrix multiply (AMX-BF16 with AMX-TILE).
    pub amx_bf16: bool,
    /// u8 × i8 dot products into i32 on 512-bit registers (AVX512_VNNI).
    pub avx512_vnni: bool,
    /// Byte tile matrix multiply (AMX-INT8 with AMX-TILE).
    pub amx_int8: bool,
    /// u8 × i8 dot products into i32 on 256-bit registers, VEX-encoded
    /// (AVX-VNNI: Intel's cores from Alder Lake on, without AVX-512).
    pub avx_vnni: bool,
    /// Whether AVX512_BF16's `vdpbf16ps` outruns 512-bit f32 FMAs here by
    /// a clear margin, measured ([`peak::bf16_dot_outruns_fma`]): AMD's
    /// Zen 4 yes (2× the flops), Intel's cores no (half).
    pub bf16_dot_outruns_fma: bool,
}

impl CpuFeatures {
    /// Whether the CPU multiplies a bf16 base faster than an f32 one (a
    /// [`Self::bf16_kernel`] runs here), the condition for `--dtype auto` to
    /// pick a bf16 base.
    pub fn has_bf16_arithmetic(&self) -> bool {
        self.bf16_kernel().is_some()
    }

    /// The instruction set a bf16 base's products run on, where the CPU has
    /// one tuneforge has a kernel for: [`Bf16Kernel::AmxBf16`] (where the
    /// operating system also lets the process use the tiles,
    /// [`amx_permitted`]), else [`Bf16Kernel::Avx512Bf16`] where its dot
    /// products outrun f32 FMAs ([`Self::bf16_dot_outruns_fma`]; on Intel's
    /// cores they run at half the FMAs' flops, and a bf16 base multiplied
    /// with them trained at 0.6× the f32 base's speed). Both kernels need
    /// AVX-512 F and BW besides (to round and pack their operands).
    /// Elsewhere a bf16 base is multiplied in f32.
    pub fn bf16_kernel(&self) -> Option<Bf16Kernel> {
        if !self.runs_bf16_dot_kernel() {
            return None;
        }
        match (self.amx_bf16 && amx_permitted(), self.bf16_dot_outruns_fma) {
            (true, _) => Some(Bf16Kernel::AmxBf16),
            (false, true) => Some(Bf16Kernel::Avx512Bf16),
            (false, false) => None,
        }
    }

    /// Whether this CPU can run the bf16 kernels' vector code (AVX512_BF16
    /// with AVX-512 F and BW), whether or not a bf16 base's products take
    /// them ([`Self::bf16_kernel`]): where the kernels' tests run.
    pub fn runs_bf16_dot_kernel(&self) -> bool {
        #[cfg(target_arch = "x86_64")]
        let bw = is_x86_feature_detected!("avx512bw");
        #[cfg(not(target_arch = "x86_64"))]
        let bw = false;
        self.avx512f && bw && self.avx512_bf16
    }

    /// The instruction set products with Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and
    /// Q2_K to Q6_K blocks run on, where the CPU has one tuneforge has a
    /// kernel for: [`Int8Kernel::Avx512Vnni`] (with AVX-512 F, BW and DQ
    /// besides, to round the rows and scale the sums), else
    /// [`Int8Kernel::AvxVnni`] (with AVX2 and FMA). Elsewhere the blocks are
    /// dequantized to f32.
    ///
    /// [`Int8Kernel::AmxInt8`] runs only where [`AMX_INT8_VAR`] asks for it
    /// (and the operating system lets the process use the tiles,
    /// [`amx_permitted`]): on the one AMX machine it has met (an Intel Xeon,
    /// 2026-11-27), the tile kernel multiplied Q4_K blocks at 0.79× the
    /// speed of the f32 products of dequantized tiles, where the
    /// AVX512_VNNI kernel runs at 1.58× them on an AVX-512 core. Likely
    /// (not profiled there) because each group of 32 values has its own
    /// scales, so every tile product is stored and scaled by vector code
    /// before the next.
    pub fn int8_kernel(&self) -> Option<Int8Kernel> {
        self.int8_kernel_given(amx_int8_asked_for() && amx_permitted())
    }

    /// [`Self::int8_kernel`], the AMX-INT8 tiles taken where this CPU has
    /// them if `tiles`.
    fn int8_kernel_given(&self, tiles: bool) -> Option<Int8Kernel> {
        #[cfg(target_arch = "x86_64")]
        let rest = is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512dq");
        #[cfg(not(target_arch = "x86_64"))]
        let rest = false;
        match (self.avx512f && rest, self.amx_int8, self.avx512_vnni) {
            (true, true, true) if tiles => Some(Int8Kernel::AmxInt8),
            (true, _, true) => Some(Int8Kernel::Avx512Vnni),
            _ if self.avx_vnni && self.avx2_fma => Some(Int8Kernel::AvxVnni),
            _ => None,
        }
    }

    /// The instruction sets present, e.g. `AVX2+FMA, AVX-512F`.
    pub fn describe(&self) -> String {
        let names = [
            (self.avx2_fma, "AVX2+FMA"),
            (self.avx512f, "AVX-512F"),
            (self.avx_vnni, "AVX-VNNI"),
            (self.avx512_vnni, "AVX512_VNNI"),
            (self.avx512_bf16, "AVX512_BF16"),
            (self.amx_bf16, "AMX-BF16"),
            (self.amx_int8, "AMX-INT8"),
        ];
        let present: Vec<&str> = names.iter().filter(|(h, _)| *h).map(|(_, n)| *n).collect();
        match present.is_empty() {
            true => "no SIMD f32 FMA".into(),
            false => present.join(", "),
        }
    }
}

/// The instruction set a bf16 base's products run on
/// ([`CpuFeatures::bf16_kernel`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bf16Kernel {
    /// 16 × 16 f32 outputs per tile product (`tdpbf16ps`).
    AmxBf16,
    /// Two bf16 products into each of 16 f32 lanes (`vdpbf16ps`).
    Avx512Bf16,
}

impl Bf16Kernel {
    /// The instruction set's name, as Intel writes it: `AMX-BF16` or
    /// `AVX512_BF16`.
    pub fn name(self) -> &'static str {
        match self {
            Self::AmxBf16 => "AMX-BF16",
            Self::Avx512Bf16 => "AVX512_BF16",
        }
    }

    /// Whether the products run on AMX tiles.
    pub fn on_tiles(self) -> bool {
        self == Self::AmxBf16
    }
}

impl std::fmt::Display for Bf16Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The instruction set products with int8-read blocks run on
/// ([`CpuFeatures::int8_kernel`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Int8Kernel {
    /// Byte tile products (`tdpbsud`).
    AmxInt8,
    /// u8 × i8 dot products on 512-bit registers (`vpdpbusd`, EVEX).
    Avx512Vnni,
    /// u8 × i8 dot products on 256-bit registers (`vpdpbusd`, VEX).
    AvxVnni,
}

impl Int8Kernel {
    /// The instruction set's name, as Intel writes it: `AMX-INT8`,
    /// `AVX512_VNNI` or `AVX-VNNI`.
    pub fn name(self) -> &'static str {
        match self {
            Self::AmxInt8 => "AMX-INT8",
            Self::Avx512Vnni => "AVX512_VNNI",
            Self::AvxVnni => "AVX-VNNI",
        }
    }

    /// Whether the products run on AMX tiles.
    pub fn on_tiles(self) -> bool {
        self == Self::AmxInt8
    }
}

impl std::fmt::Display for Int8Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The environment variable that caps the instruction sets tuneforge's own
/// kernels use: `avx2` (no AVX-512, AMX or AVX-VNNI) or `avx512` (no AMX), to run or
/// measure the paths of a smaller CPU on a larger one. (candle and `gemm`
/// pick their own.)
pub const MAX_ISA_VAR: &str = "TUNEFORGE_MAX_ISA";

/// The environment variable that, set to `1`, runs products with blocks on
/// the AMX-INT8 tile kernel where the CPU has it (see
/// [`CpuFeatures::int8_kernel`] for why it is not the default).
pub const AMX_INT8_VAR: &str = "TUNEFORGE_AMX_INT8";

/// Whether [`AMX_INT8_VAR`] is `1` (read once).
fn amx_int8_asked_for() -> bool {
    static ASKED: OnceLock<bool> = OnceLock::new();
    *ASKED.get_or_init(|| asks_for_amx_int8(std::env::var(AMX_INT8_VAR).ok().as_deref()))
}

/// Whether a value of [`AMX_INT8_VAR`] asks for the AMX-INT8 kernel.
fn asks_for_amx_int8(value: Option<&str>) -> bool {
    value.is_some_and(|v| v.trim() == "1")
}

/// This CPU's features, detected on the first call, capped by
/// [`MAX_ISA_VAR`] where it is set.
pub fn features() -> CpuFeatures {
    static FEATURES: OnceLock<CpuFeatures> = OnceLock::new();
    *FEATURES.get_or_init(|| {
        let cap = std::env::var(MAX_ISA_VAR).ok();
        capped(detect(), cap.as_deref()).unwrap_or_else(|e| {
            eprintln!("warning: {e}; using every instruction set this CPU has");
            detect()
        })
    })
}

/// `features` without what `max_isa` (`avx2`, `avx512`, or none) leaves out.
fn capped(features: CpuFeatures, max_isa: Option<&str>) -> Result<CpuFeatures, String> {
    let no_amx = CpuFeatures {
        amx_bf16: false,
        amx_int8: false,
        ..features
    };
    match max_isa.map(str::to_ascii_lowercase).as_deref() {
        None => Ok(features),
        Some("avx512") => Ok(no_amx),
        Some("avx2") => Ok(CpuFeatures {
            avx512f: false,
            avx512_bf16: false,
            avx512_vnni: false,
            avx_vnni: false,
            bf16_dot_outruns_fma: false,
            ..no_amx
        }),
        Some(other) => Err(format!("{MAX_ISA_VAR}={other} is not one of avx2, avx512")),
    }
}

#[cfg(target_arch = "x86_64")]
fn detect() -> CpuFeatures {
    use std::arch::x86_64::__cpuid_count;
    // Leaf 7 is read only where leaf 0 says it exists.
    let leaf7_edx = match __cpuid_count(0, 0).eax >= 7 {
        true => __cpuid_count(7, 0).edx,
        false => 0,
    };
    // Leaf 7 EDX: bit 22 AMX-BF16, bit 24 AMX-TILE, bit 25 AMX-INT8.
    let tile = leaf7_edx & (1 << 24) != 0;
    let avx512_bf16 = is_x86_feature_detected!("avx512bf16");
    CpuFeatures {
        avx2_fma: is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
        avx512f: is_x86_feature_detected!("avx512f"),
        avx512_bf16,
        amx_bf16: tile && leaf7_edx & (1 << 22) != 0,
        avx512_vnni: is_x86_feature_detected!("avx512vnni"),
        amx_int8: tile && leaf7_edx & (1 << 25) != 0,
        avx_vnni: is_x86_feature_detected!("avxvnni"),
        bf16_dot_outruns_fma: avx512_bf16 && peak::bf16_dot_outruns_fma(),
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> CpuFeatures {
    CpuFeatures::default()
}

/// Whether the operating system lets this process use AMX tile data:
/// Linux asks for it (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`),
/// once per process, and the answer is kept. `false` on other systems and
/// where the CPU has no AMX.
pub fn amx_permitted() -> bool {
    static PERMITTED: OnceLock<bool> = OnceLock::new();
    *PERMITTED.get_or_init(|| {
        let cpu = detect();
        (cpu.amx_bf16 || cpu.amx_int8) && request_tile_data()
    })
}

/// Asks Linux for the process's permission to use AMX tile data.
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
fn request_tile_data() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a system call with two integer arguments, no memory.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    rc == 0
}

/// No AMX outside Linux on x86-64.
#[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
fn request_tile_data() -> bool {
    false
}

/// The CPU's model name (`/proc/cpuinfo`), where the system says it.
pub fn model_name() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    info.lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, name)| name.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The features agree with the kernel's own list of CPU flags, where the
    /// system has one.
    #[test]
    fn features_agree_with_proc_cpuinfo() {
        let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") else {
            eprintln!("skipped: no /proc/cpuinfo on this system");
            return;
        };
        let Some(flags) = info.lines().find(|l| l.starts_with("flags")) else {
            eprintln!("skipped: /proc/cpuinfo lists no flags");
            return;
        };
        let has = |flag: &str| flags.split_whitespace().any(|f| f == flag);
        let f = detect();
        assert_eq!(f.avx2_fma, has("avx2") && has("fma"), "{flags}");
        assert_eq!(f.avx512f, has("avx512f"));
        assert_eq!(f.avx512_bf16, has("avx512_bf16"));
        assert_eq!(f.amx_bf16, has("amx_bf16") && has("amx_tile"));
        assert_eq!(f.amx_int8, has("amx_int8") && has("amx_tile"));
        assert_eq!(f.avx_vnni, has("avx_vnni"));
        assert_eq!(f.avx512_vnni, has("avx512_vnni"));
        assert!(!f.describe().is_empty());
    }

    /// `TUNEFORGE_MAX_ISA` leaves out what it caps, and nothing else; an
    /// unknown value is refused with the known ones.
    #[test]
    fn the_cap_leaves_out_the_larger_instruction_sets() {
        let all = CpuFeatures {
            avx2_fma: true,
            avx512f: true,
            avx512_bf16: true,
            amx_bf16: true,
            avx512_vnni: true,
            amx_int8: true,
            avx_vnni: true,
            bf16_dot_outruns_fma: true,
        };
        assert_eq!(capped(all, None), Ok(all));
        let avx2 = capped(all, Some("AVX2")).unwrap();
        assert_eq!(avx2.describe(), "AVX2+FMA");
        assert_eq!((avx2.int8_kernel(), avx2.bf16_kernel()), (None, None));
        let avx512 = capped(all, Some("avx512")).unwrap();
        assert!(!avx512.amx_bf16 && !avx512.amx_int8);
        assert!(avx512.avx512_vnni && avx512.avx512_bf16);
        let err = capped(all, Some("sse2")).unwrap_err();
        assert!(err.contains("avx2, avx512"), "{err}");
    }

    /// A Xeon with AMX-INT8 and AVX512_VNNI multiplies blocks with
    /// AVX512_VNNI, and with AMX-INT8 only where [`AMX_INT8_VAR`] asks.
    #[test]
    fn amx_int8_runs_only_where_asked_for() {
        #[cfg(target_arch = "x86_64")]
        if !(is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512dq")) {
            eprintln!(
                "skipped: the AVX-512 kernels also need AVX-512 BW and DQ, which this CPU lacks"
            );
            return;
        }
        let xeon = CpuFeatures {
            avx2_fma: true,
            avx512f: true,
            avx512_vnni: true,
            amx_int8: true,
            ..CpuFeatures::default()
        };
        assert_eq!(xeon.int8_kernel_given(false), Some(Int8Kernel::Avx512Vnni));
        assert_eq!(xeon.int8_kernel_given(true), Some(Int8Kernel::AmxInt8));
        assert!(asks_for_amx_int8(Some("1")) && asks_for_amx_int8(Some(" 1\n")));
        assert!(!asks_for_amx_int8(Some("0")) && !asks_for_amx_int8(Some("")));
        assert!(!asks_for_amx_int8(None));
        let set = std::env::var(AMX_INT8_VAR).ok();
        assert_eq!(amx_int8_asked_for(), asks_for_amx_int8(set.as_deref()));
    }

    /// AVX512_BF16 alone takes the dot kernel (and `auto` a bf16 base) only
    /// where its dot products outrun the f32 FMAs: an AMD Zen 4 core, not an
    /// Intel core without AMX. The kernel's tests run on both.
    #[test]
    fn the_bf16_dot_kernel_runs_only_where_it_outruns_f32() {
        #[cfg(target_arch = "x86_64")]
        if !is_x86_feature_detected!("avx512bw") {
            eprintln!("skipped: the bf16 kernels also need AVX-512 BW, which this CPU lacks");
            return;
        }
        let zen4 = CpuFeatures {
            avx2_fma: true,
            avx512f: true,
            avx512_bf16: true,
            bf16_dot_outruns_fma: true,
            ..CpuFeatures::default()
        };
        assert_eq!(zen4.bf16_kernel(), Some(Bf16Kernel::Avx512Bf16));
        assert!(zen4.has_bf16_arithmetic() && zen4.runs_bf16_dot_kernel());
        let cooper_lake = CpuFeatures {
            bf16_dot_outruns_fma: false,
            ..zen4
        };
        assert_eq!(cooper_lake.bf16_kernel(), None);
        assert!(!cooper_lake.has_bf16_arithmetic() && cooper_lake.runs_bf16_dot_kernel());
    }

    /// A laptop core with AVX-VNNI but no AVX-512 gets the 256-bit int8
    /// kernel and no bf16 one; the kernels print as Intel names their
    /// instruction sets, and only the AMX ones run on tiles.
    #[test]
    fn kernels_are_chosen_and_named_by_their_instruction_sets() {
        let laptop = CpuFeatures {
            avx2_fma: true,
            avx_vnni: true,
            ..CpuFeatures::default()
        };
        assert_eq!(laptop.int8_kernel(), Some(Int8Kernel::AvxVnni));
        assert_eq!(laptop.bf16_kernel(), None);
        let no_fma = CpuFeatures {
            avx2_fma: false,
            ..laptop
        };
        assert_eq!(no_fma.int8_kernel(), None);
        let names = [
            Int8Kernel::AmxInt8.to_string(),
            Int8Kernel::Avx512Vnni.to_string(),
            Int8Kernel::AvxVnni.to_string(),
            Bf16Kernel::AmxBf16.to_string(),
            Bf16Kernel::Avx512Bf16.to_string(),
        ];
        assert_eq!(
            names,
            [
                "AMX-INT8",
                "AVX512_VNNI",
                "AVX-VNNI",
                "AMX-BF16",
                "AVX512_BF16"
            ]
        );
        assert!(Int8Kernel::AmxInt8.on_tiles() && Bf16Kernel::AmxBf16.on_tiles());
        assert!(!Int8Kernel::Avx512Vnni.on_tiles() && !Int8Kernel::AvxVnni.on_tiles());
        assert!(!Bf16Kernel::Avx512Bf16.on_tiles());
    }
}
