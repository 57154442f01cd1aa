"""The kernel side: libbpf bindings, the BPF objects and their maps, the kernel path."""
