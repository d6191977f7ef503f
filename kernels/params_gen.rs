//! The generator of the kernels' parameter structs, shared by `kernels/build.rs` (which runs it on
//! every build) and the crate's unit tests (which run it on sample structs).
//!
//! Each kernel's step scalars are one `#[repr(C)]` Rust struct, marked by a `// cuda-params` line
//! right above its attributes, in its algorithm's module (`src/algorithms/<module>.rs`; the
//! reductions' in `src/reduce.rs`). This line parser reads those definitions and generates
//!
//! * the C declarations (same names, same field order; `f64` → `double`, `u32` →
//!   `unsigned int`), with `static_assert`s of every offset and of the size the generator computes
//!   with C's layout rules, and of the fit in `TensorEntry`'s parameter area: `kernels/params.cuh`
//!   (committed; the build fails when it differs from what the Rust source generates);
//! * the Rust side: each struct's `KernelParams` implementation (its bytes written at the
//!   generator's offsets, from an exhaustive destructuring, so a field the parser missed does not
//!   compile) and `const` asserts that rustc's `size_of`/`offset_of!` equal the generator's
//!   numbers (`$OUT_DIR/params.rs`, included by `src/algorithm.rs`).
//!
//! Both compilers are checked against the same computed layout, so they agree with each other.
//! A field type other than `f64` or `u32`, an attribute inside the struct, or a missing
//! `#[repr(C)]` is an error.

/// The marker line above a parameter struct.
pub const MARKER: &str = "// cuda-params";

/// A field type a kernel parameter may have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ty {
    /// `f64` / `double`.
    F64,
    /// `u32` / `unsigned int` (flags and small enums).
    U32,
}

impl Ty {
    fn parse(s: &str) -> Option<Ty> {
        match s {
            "f64" => Some(Ty::F64),
            "u32" => Some(Ty::U32),
            _ => None,
        }
    }

    /// Size and alignment in bytes (equal for both types, on both sides).
    pub fn size(self) -> usize {
        match self {
            Ty::F64 => 8,
            Ty::U32 => 4,
        }
    }

    fn c(self) -> &'static str {
        match self {
            Ty::F64 => "double",
            Ty::U32 => "unsigned int",
        }
    }

    fn rust(self) -> &'static str {
        match self {
            Ty::F64 => "f64",
            Ty::U32 => "u32",
        }
    }
}

/// One parameter struct as declared in Rust.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamsStruct {
    /// The struct's name (`AdamWParams`).
    pub name: String,
    /// The Rust module that defines it (`crate::algorithms::adamw`).
    pub module: String,
    /// The source file, for messages and comments.
    pub file: String,
    /// Its fields in declaration order.
    pub fields: Vec<(String, Ty)>,
}

impl ParamsStruct {
    /// Each field's offset and the struct's size, by C's rules: a field at the next multiple of
    /// its alignment, the size rounded up to the largest alignment.
    pub fn layout(&self) -> (Vec<usize>, usize) {
        let mut offsets = Vec::with_capacity(self.fields.len());
        let (mut at, mut align) = (0usize, 1usize);
        for (_, ty) in &self.fields {
            let a = ty.size();
            at = at.next_multiple_of(a);
            offsets.push(at);
            at += a;
            align = align.max(a);
        }
        (offsets, at.next_multiple_of(align))
    }
}

/// Every struct marked [`MARKER`] in `src`, the Rust source of `module` (read from `file`).
pub fn parse(src: &str, module: &str, file: &str) -> Result<Vec<ParamsStruct>, String> {
    let mut out = Vec::new();
    let mut lines = src.lines().enumerate();
    while let Some((_, line)) = lines.next() {
        if line.trim() != MARKER {
            continue;
        }
        let err = |n: usize, what: &str| format!("{file}:{}: {what}", n + 1);
        let mut repr_c = false;
        // Attributes and doc comments, then the struct line.
        let name = loop {
            let Some((n, l)) = lines.next() else {
                return Err(format!("{file}: `{MARKER}` is not followed by a struct"));
            };
            let l = l.trim();
            if l == "#[repr(C)]" {
                repr_c = true;
            } else if l.starts_with("///")
                || l.starts_with("#[derive(")
                || l.starts_with("#[doc")
                || (l.starts_with("#[allow(") || l.starts_with("#[cfg_attr("))
                    && l.contains("allow(")
            {
            } else if let Some(rest) = l
                .strip_prefix("pub struct ")
                .or_else(|| l.strip_prefix("pub(crate) struct "))
            {
                let Some(name) = rest.strip_suffix('{') else {
                    return Err(err(n, "expected `pub struct Name {` on one line"));
                };
                break name.trim().to_string();
            } else {
                return Err(err(n, &format!("unexpected line before the struct: `{l}`")));
            }
        };
        if !repr_c {
            return Err(format!(
                "{file}: {name} (marked `{MARKER}`) must be #[repr(C)]"
            ));
        }
        let mut fields = Vec::new();
        loop {
            let Some((n, l)) = lines.next() else {
                return Err(format!("{file}: {name} is not closed"));
            };
            let l = l.trim();
            if l == "}" {
                break;
            }
            if l.is_empty() || l.starts_with("//") {
                continue;
            }
            let f = l
                .strip_prefix("pub(crate) ")
                .or_else(|| l.strip_prefix("pub "))
                .unwrap_or(l);
            let Some((field, ty)) = f.strip_suffix(',').and_then(|f| f.split_once(':')) else {
                return Err(err(
                    n,
                    &format!("expected `name: type,` in {name}, got `{l}`"),
                ));
            };
            let (field, ty) = (field.trim(), ty.trim());
            if field.is_empty() || !field.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(err(
                    n,
                    &format!("expected `name: type,` in {name}, got `{l}`"),
                ));
            }
            let Some(ty) = Ty::parse(ty) else {
                return Err(err(
                    n,
                    &format!(
                        "{name}.{field}: type `{ty}` is not a kernel parameter type (f64, u32)"
                    ),
                ));
            };
            fields.push((field.to_string(), ty));
        }
        if fields.is_empty() {
            return Err(format!("{file}: {name} has no fields"));
        }
        out.push(ParamsStruct {
            name,
            module: module.to_string(),
            file: file.to_string(),
            fields,
        });
    }
    Ok(out)
}

/// The C header (`kernels/params.cuh`) for `structs`, with asserts that each fits a
/// `TensorEntry`'s parameter area (`CO_PARAM_BYTES`).
pub fn c_header(structs: &[ParamsStruct]) -> String {
    let mut h = String::from(
        "// GENERATED by kernels/build.rs (kernels/params_gen.rs) from the `// cuda-params` structs of\n\
         // src/algorithms/*.rs and src/reduce.rs: do not edit (edit the Rust structs and rebuild; the\n\
         // build fails until this file matches). Each kernel reads its step scalars as\n\
         //   const XParams& q = co_params<XParams>(t);\n\
         // and the asserts check nvcc's layout against the one rustc's asserts check.\n\
         #pragma once\n#include <cstddef>\n#include \"abi.cuh\"\n",
    );
    for s in structs {
        let (offsets, size) = s.layout();
        let n = &s.name;
        h.push_str(&format!("\n// {} ({})\nstruct {n} {{\n", s.file, s.module));
        for (f, ty) in &s.fields {
            h.push_str(&format!("  {} {f};\n", ty.c()));
        }
        h.push_str("};\n");
        h.push_str(&format!(
            "static_assert(sizeof({n}) == {size}, \"{n}: layout shared with {}\");\n",
            s.file
        ));
        for ((f, _), off) in s.fields.iter().zip(&offsets) {
            h.push_str(&format!(
                "static_assert(offsetof({n}, {f}) == {off}, \"{n}.{f}\");\n"
            ));
        }
        h.push_str(&format!(
            "static_assert(sizeof({n}) <= CO_PARAM_BYTES, \"{n}: fits TensorEntry's parameter area\");\n"
        ));
    }
    h
}

/// The Rust side (`$OUT_DIR/params.rs`): each struct's `KernelParams` implementation and the
/// asserts that rustc's layout is the generator's; `area` is the parameter area's size.
pub fn rust_impls(structs: &[ParamsStruct], area: usize) -> String {
    let mut r = String::from(
        "// GENERATED by kernels/build.rs (kernels/params_gen.rs) from the `// cuda-params` structs.\n",
    );
    for s in structs {
        let (offsets, size) = s.layout();
        let path = format!("{}::{}", s.module, s.name);
        let names: Vec<&str> = s.fields.iter().map(|(f, _)| f.as_str()).collect();
        r.push_str(&format!(
            "\nimpl crate::algorithm::KernelParams for {path} {{\n    const SIZE: usize = {size};\n\
             \n    fn write_bytes(&self, out: &mut [u8]) {{\n        let Self {{ {} }} = *self;\n",
            names.join(", ")
        ));
        for ((f, ty), off) in s.fields.iter().zip(&offsets) {
            r.push_str(&format!(
                "        out[{off}..{}].copy_from_slice(&{}::to_ne_bytes({f}));\n",
                off + ty.size(),
                ty.rust()
            ));
        }
        r.push_str("    }\n}\n\nconst _: () = {\n");
        r.push_str(&format!("    use {path} as S;\n"));
        r.push_str(&format!(
            "    assert!(std::mem::size_of::<S>() == {size});\n"
        ));
        for (f, off) in names.iter().zip(&offsets) {
            r.push_str(&format!(
                "    assert!(std::mem::offset_of!(S, {f}) == {off});\n"
            ));
        }
        r.push_str(&format!(
            "    assert!(std::mem::size_of::<S>() <= {area});\n}};\n"
        ));
    }
    r.push_str("\n/// Each parameter struct's name and size as rustc lays it out.\n#[cfg(test)]\n");
    r.push_str("pub(crate) const PARAM_SIZES: &[(&str, usize)] = &[\n");
    for s in structs {
        r.push_str(&format!(
            "    (\"{}\", std::mem::size_of::<{}::{}>()),\n",
            s.name, s.module, s.name
        ));
    }
    r.push_str("];\n");
    r
}
