fn main() {
    ferry_cni::skel::main(&ferry_bandwidth::Bandwidth)
}
