fn main() {
    cowsnap_fuzz::main(cowsnap::image::fuzz::Target::Plan);
}
