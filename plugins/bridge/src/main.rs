fn main() {
    ferry_cni::skel::main(&ferry_bridge::Bridge)
}
