"""DICOM networking: federated C-FIND, C-MOVE/C-GET retrieval and the bridge's storage SCP."""
