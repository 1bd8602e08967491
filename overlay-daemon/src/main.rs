fn main() {
    std::process::exit(ferryd::daemon::main());
}
