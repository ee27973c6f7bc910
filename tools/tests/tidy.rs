//! Repository hygiene that the build enforces: cargo's output stays out of our `target/`
//! sources, `unsafe` stays in `ffi/` and every unsafe block there says why it is sound.

use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name != "build" && !name.starts_with('.') && name != "fuzz" {
                rust_files(&path, out);
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn cargo_output_is_not_in_target_sources() {
    let root = repo();
    for junk in ["target/debug", "target/release", "target/.rustc_info.json", "target/CACHEDIR.TAG"]
    {
        assert!(
            !root.join(junk).exists(),
            "{junk} exists: cargo must build into build/ (.cargo/config.toml)"
        );
    }
    let config =
        std::fs::read_to_string(root.join(".cargo/config.toml")).expect(".cargo/config.toml");
    assert!(config.contains("target-dir = \"build/cargo\""));
    let ignore = std::fs::read_to_string(root.join(".gitignore")).expect(".gitignore");
    for line in ignore.lines() {
        let l = line.trim();
        assert!(
            l != "/target" && l != "target" && l != "target/" && l != "/target/",
            ".gitignore hides target/"
        );
    }
}

#[test]
fn unsafe_lives_in_ffi_with_safety_comments() {
    let root = repo();
    let mut files = Vec::new();
    for dir in ["engine", "target", "tools", "ffi"] {
        rust_files(&root.join(dir), &mut files);
    }
    let mut problems = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).expect("read source");
        let in_ffi = file.starts_with(root.join("ffi"));
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            let is_unsafe = code.contains("unsafe {")
                || code.contains("unsafe impl")
                || code.contains("unsafe fn");
            if !is_unsafe || file.ends_with("tidy.rs") {
                continue;
            }
            if !in_ffi {
                problems.push(format!("{}:{}: unsafe outside ffi/", file.display(), i + 1));
                continue;
            }
            let window = &lines[i.saturating_sub(4)..=i];
            if !window.iter().any(|l| l.contains("SAFETY:")) {
                problems.push(format!(
                    "{}:{}: unsafe without a // SAFETY: comment",
                    file.display(),
                    i + 1
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
