pub mod proto {
    tonic::include_proto!("cowsnap.v1");
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("cowsnap_v1_descriptor");
}
