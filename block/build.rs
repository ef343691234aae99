//! Links librbd and librados only when the `rbd` feature is on: the
//! default build needs no Ceph libraries.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_RBD").is_some() {
        println!("cargo:rustc-link-lib=rbd");
        println!("cargo:rustc-link-lib=rados");
    }
}
