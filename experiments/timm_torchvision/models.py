import functools

import timm
import torchvision
from torch import nn

NC = 5
GN = functools.partial(nn.GroupNorm, 2)


def gn(c):
    return nn.GroupNorm(2, c)


def vit(**kw):
    from timm.models.vision_transformer import VisionTransformer

    base = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=NC)
    base.update(kw)
    return lambda: VisionTransformer(**base)


MODELS = {}


def add(name, build, **kw):
    MODELS[name] = dict(build=build, **kw)


# ---------------- timm ----------------
add("timm_vit", vit())
add("timm_vit_train", vit(), mode="train")
add("timm_vit_avg_noclstoken", vit(class_token=False, global_pool="avg"), mode="train")
add("timm_vit_reg_tokens", vit(reg_tokens=2), mode="train")
add("timm_vit_layerscale", vit(init_values=0.1), mode="train")
add("timm_vit_noqkvbias", vit(qkv_bias=False), mode="train")
add("timm_vit_no_embed_class", vit(no_embed_class=True), mode="train")
add("timm_vit_map_pool", vit(global_pool="map"), mode="train")
add("timm_vit_droppath_train", vit(drop_path_rate=0.3), mode="train")
add(
    "timm_vit_dropout_train",
    vit(drop_rate=0.2, proj_drop_rate=0.2, attn_drop_rate=0.2),
    mode="train",
)
add("timm_vit_qknorm", vit(qk_norm=True), mode="train")
add("timm_vit_fc_norm", vit(global_pool="avg", fc_norm=True, class_token=False), mode="train")
add("timm_vit_pos_drop_patch_drop", vit(patch_drop_rate=0.25), mode="train")
add("timm_vit_dynimg", vit(dynamic_img_size=True), mode="train")
add(
    "timm_vit_pre_norm_swiglu",
    vit(pre_norm=True, mlp_layer=timm.layers.SwiGLUPacked, mlp_ratio=2.0),
    mode="train",
)


def deit():
    from timm.models.deit import VisionTransformerDistilled

    return VisionTransformerDistilled(
        img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=NC
    )


add("timm_deit_distilled", deit, mode="train")


def deit_fwd_both(m, x):
    # distilled training: both heads, average of the two logits (distilled_training=True)
    m.set_distilled_training(True)
    a, b = m(x)
    return (a + b) / 2


add("timm_deit_distilled_training", deit, mode="train", input_fn=deit_fwd_both)


def beit(**kw):
    from timm.models.beit import Beit

    base = dict(
        img_size=16,
        patch_size=4,
        embed_dim=32,
        depth=2,
        num_heads=2,
        num_classes=NC,
        use_rel_pos_bias=True,
        init_values=0.1,
    )
    base.update(kw)
    return lambda: Beit(**base)


add("timm_beit", beit(), mode="train")
add(
    "timm_beit_shared_relpos_abs",
    beit(use_rel_pos_bias=False, use_shared_rel_pos_bias=True, use_abs_pos_emb=True),
    mode="train",
)


def swin(**kw):
    from timm.models.swin_transformer import SwinTransformer

    base = dict(
        img_size=32,
        patch_size=4,
        window_size=4,
        embed_dim=16,
        depths=(2, 2),
        num_heads=(2, 2),
        num_classes=NC,
    )
    base.update(kw)
    return lambda: SwinTransformer(**base)


add("timm_swin", swin(), img=32, mode="train")


def swinv2(**kw):
    from timm.models.swin_transformer_v2 import SwinTransformerV2

    base = dict(
        img_size=32,
        patch_size=4,
        window_size=4,
        embed_dim=16,
        depths=(2, 2),
        num_heads=(2, 2),
        num_classes=NC,
    )
    base.update(kw)
    return lambda: SwinTransformerV2(**base)


add("timm_swinv2", swinv2(), img=32, mode="train")


def convnext(**kw):
    from timm.models.convnext import ConvNeXt

    base = dict(depths=(1, 1), dims=(16, 32), num_classes=NC, ls_init_value=0.1)
    base.update(kw)
    return lambda: ConvNeXt(**base)


add("timm_convnext", convnext(), img=32, mode="train")
add("timm_convnext_convmlp", convnext(conv_mlp=True), img=32, mode="train")
add("timm_convnext_headnorm_first", convnext(head_norm_first=True), img=32, mode="train")
add("timm_convnext_droppath", convnext(drop_path_rate=0.5), img=32, mode="train")
add("timm_convnext_v2_grn", convnext(use_grn=True, ls_init_value=None), img=32, mode="train")


def eva(**kw):
    from timm.models.eva import Eva

    base = dict(
        img_size=16,
        patch_size=4,
        embed_dim=32,
        depth=2,
        num_heads=2,
        num_classes=NC,
        use_rot_pos_emb=True,
        swiglu_mlp=True,
        mlp_ratio=2.0,
        ref_feat_shape=(4, 4),
    )
    base.update(kw)
    return lambda: Eva(**base)


add("timm_eva_rope_swiglu", eva(), mode="train")
add(
    "timm_eva_layerscale_scalemlp",
    eva(init_values=0.1, scale_mlp=True, qkv_fused=False),
    mode="train",
)


def cait():
    from timm.models.cait import Cait

    return Cait(
        img_size=16,
        patch_size=4,
        embed_dim=32,
        depth=2,
        num_heads=2,
        num_classes=NC,
        depth_token_only=1,
        init_values=0.1,
    )


add("timm_cait", cait, mode="train")


def mixer():
    from timm.models.mlp_mixer import MlpMixer

    return MlpMixer(num_classes=NC, img_size=16, patch_size=4, num_blocks=2, embed_dim=32)


add("timm_mlp_mixer", mixer, mode="train")


def resmlp():
    from timm.models.mlp_mixer import Affine, MlpMixer, ResBlock

    return MlpMixer(
        num_classes=NC,
        img_size=16,
        patch_size=4,
        num_blocks=2,
        embed_dim=32,
        mlp_ratio=4,
        block_layer=functools.partial(ResBlock, init_values=0.1),
        norm_layer=Affine,
    )


add("timm_resmlp_affine", resmlp, mode="train")


def gmlp():
    from timm.models.mlp_mixer import MlpMixer, SpatialGatingBlock

    return MlpMixer(
        num_classes=NC,
        img_size=16,
        patch_size=4,
        num_blocks=2,
        embed_dim=32,
        mlp_ratio=2,
        block_layer=SpatialGatingBlock,
    )


add("timm_gmlp_spatial_gating", gmlp, mode="train")


def poolformer():
    from timm.models.metaformer import MetaFormer

    return MetaFormer(depths=(1, 1), dims=(16, 32), num_classes=NC)


add("timm_poolformer_metaformer", poolformer, img=32, mode="train")


def poolformer_v1():
    return timm.create_model(
        "poolformer_s12",
        pretrained=False,
        num_classes=NC,
        depths=(1, 1, 1, 1),
        dims=(8, 16, 16, 16),
    )


add("timm_poolformer_s12_tiny", poolformer_v1, img=32, mode="train")


def effnet_eval():
    return timm.create_model(
        "efficientnet_b0",
        pretrained=False,
        num_classes=NC,
        channel_multiplier=0.25,
        depth_multiplier=0.25,
    )


add("timm_efficientnet_b0_eval", effnet_eval, img=32, mode="eval")


def effnet_gn():
    return timm.create_model(
        "efficientnet_b0",
        pretrained=False,
        num_classes=NC,
        channel_multiplier=0.25,
        depth_multiplier=0.25,
        norm_layer=functools.partial(timm.layers.GroupNormAct, 2),
    )


add("timm_efficientnet_b0_gnact_train", effnet_gn, img=32, mode="train")


def mnv3():
    return timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=NC)


add("timm_mobilenetv3_small_eval", mnv3, img=32, mode="eval")
add(
    "timm_mobilenetv3_small_train_bn",
    mnv3,
    img=32,
    mode="train",
    note="expected refusal (BN train)",
)


def regnet():
    from timm.models.regnet import RegNet, RegNetCfg

    cfg = RegNetCfg(depth=4, w0=8, wa=8.0, wm=2.0, group_size=8, se_ratio=0.25, stem_width=8)
    return RegNet(cfg, num_classes=NC)


add("timm_regnet_se_eval", regnet, img=32, mode="eval")


def resnet_gn():
    from timm.models.resnet import BasicBlock, ResNet

    return (
        ResNet(BasicBlock, [1, 1, 1, 1], num_classes=NC, norm_layer=GN, base_width=8)
        if False
        else ResNet(
            BasicBlock, [1, 1], num_classes=NC, norm_layer=GN, stem_width=8, channels=(8, 16)
        )
    )


add("timm_resnet_gn_train", resnet_gn, img=32, mode="train")


def resnet_gn_dp():
    from timm.models.resnet import BasicBlock, ResNet

    return ResNet(
        BasicBlock,
        [2, 2],
        num_classes=NC,
        norm_layer=GN,
        stem_width=8,
        channels=(8, 16),
        drop_path_rate=0.5,
    )


add("timm_resnet_gn_droppath_train", resnet_gn_dp, img=32, mode="train")


def coatnet():
    from timm.models.maxxvit import MaxxVit, MaxxVitCfg, MaxxVitConvCfg, MaxxVitTransformerCfg

    cfg = MaxxVitCfg(
        embed_dim=(16, 16, 32, 32),
        depths=(1, 1, 1, 1),
        block_type=("C", "C", "T", "T"),
        stem_width=8,
        conv_cfg=MaxxVitConvCfg(norm_layer="groupnorm" if False else "batchnorm2d"),
        transformer_cfg=MaxxVitTransformerCfg(dim_head=8),
    )
    return MaxxVit(cfg, img_size=32, num_classes=NC)


add("timm_coatnet_eval", coatnet, img=32, mode="eval")


def maxvit():
    from timm.models.maxxvit import MaxxVit, MaxxVitCfg, MaxxVitTransformerCfg

    cfg = MaxxVitCfg(
        embed_dim=(16, 32),
        depths=(1, 1),
        block_type=("M", "M"),
        stem_width=8,
        transformer_cfg=MaxxVitTransformerCfg(dim_head=8, window_size=(2, 2), grid_size=(2, 2)),
    )
    return MaxxVit(cfg, img_size=32, num_classes=NC)


add("timm_maxvit_eval", maxvit, img=32, mode="eval")


def levit():
    from timm.models.levit import Levit

    return (
        Levit(
            img_size=32,
            patch_size=16,
            embed_dim=(16, 32),
            key_dim=8,
            depth=(1, 1),
            num_heads=(2, 2),
            num_classes=NC,
            down_op="subsample",
            stem_backbone=None,
        )
        if False
        else None
    )


def xcit():
    from timm.models.xcit import Xcit

    return Xcit(
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        num_classes=NC,
        cls_attn_layers=1,
        eta=1.0,
        tokens_norm=True,
    )


add("timm_xcit_eval", xcit, img=32, mode="eval")


# ---------------- torchvision ----------------
tvm = torchvision.models


def tv_vit(**kw):
    from torchvision.models.vision_transformer import VisionTransformer

    base = dict(
        image_size=16,
        patch_size=4,
        num_layers=2,
        num_heads=2,
        hidden_dim=32,
        mlp_dim=64,
        num_classes=NC,
    )
    base.update(kw)
    return lambda: VisionTransformer(**base)


add("tv_vit", tv_vit(), mode="train")
add("tv_vit_dropout_train", tv_vit(dropout=0.2, attention_dropout=0.2), mode="train")


def tv_swin(v2=False, sd=0.0):
    from torchvision.models.swin_transformer import (
        PatchMergingV2,
        SwinTransformer,
        SwinTransformerBlockV2,
    )

    kw = dict(
        patch_size=[4, 4],
        embed_dim=16,
        depths=[2, 2],
        num_heads=[2, 2],
        window_size=[4, 4],
        num_classes=NC,
        stochastic_depth_prob=sd,
    )
    if v2:
        kw.update(block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2)
    return lambda: SwinTransformer(**kw)


add("tv_swin_v1", tv_swin(), img=32, mode="train")
add("tv_swin_v2", tv_swin(v2=True), img=32, mode="train")
add("tv_swin_v1_stochdepth_train", tv_swin(sd=0.5), img=32, mode="train")


def tv_convnext(sd=0.0):
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    cfg = [CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)]
    return lambda: ConvNeXt(cfg, stochastic_depth_prob=sd, num_classes=NC)


add("tv_convnext", tv_convnext(), img=32, mode="train")
add("tv_convnext_stochdepth_train", tv_convnext(0.5), img=32, mode="train")


def tv_maxvit():
    from torchvision.models.maxvit import MaxVit

    return MaxVit(
        input_size=(32, 32),
        stem_channels=8,
        partition_size=2,
        block_channels=[16, 32],
        block_layers=[1, 1],
        head_dim=8,
        stochastic_depth_prob=0.0,
        num_classes=NC,
    )


add("tv_maxvit_eval", tv_maxvit, img=32, mode="eval")


def tv_effnet():
    from torchvision.models.efficientnet import EfficientNet, MBConvConfig

    cfg = [
        MBConvConfig(1, 3, 1, 8, 8, 1),
        MBConvConfig(4, 3, 2, 8, 16, 1),
        MBConvConfig(4, 5, 2, 16, 16, 1),
    ]
    return EfficientNet(
        cfg, dropout=0.2, stochastic_depth_prob=0.2, num_classes=NC, last_channel=32
    )


add("tv_efficientnet_eval", tv_effnet, img=32, mode="eval")


def tv_effnet_gn():
    from torchvision.models.efficientnet import EfficientNet, MBConvConfig

    cfg = [
        MBConvConfig(1, 3, 1, 8, 8, 1),
        MBConvConfig(4, 3, 2, 8, 16, 2),
        MBConvConfig(4, 5, 2, 16, 16, 1),
    ]
    return EfficientNet(
        cfg, dropout=0.2, stochastic_depth_prob=0.5, num_classes=NC, last_channel=32, norm_layer=gn
    )


add("tv_efficientnet_gn_train_sd", tv_effnet_gn, img=32, mode="train")


def tv_mnv3():
    return tvm.mobilenet_v3_small(weights=None, num_classes=NC, width_mult=0.25)


add("tv_mobilenet_v3_small_eval", tv_mnv3, img=32, mode="eval")
add(
    "tv_mobilenet_v2_eval",
    lambda: tvm.mobilenet_v2(weights=None, num_classes=NC, width_mult=0.25),
    img=32,
    mode="eval",
)
add(
    "tv_mobilenet_v2_gn_train",
    lambda: tvm.mobilenet_v2(
        weights=None, num_classes=NC, width_mult=0.25, norm_layer=lambda c: nn.GroupNorm(1, c)
    ),
    img=32,
    mode="train",
)


def tv_shufflenet():
    from torchvision.models.shufflenetv2 import ShuffleNetV2

    return ShuffleNetV2([1, 1, 1], [8, 16, 32, 64, 64], num_classes=NC)


add("tv_shufflenet_v2_eval", tv_shufflenet, img=32, mode="eval")


def tv_densenet():
    from torchvision.models.densenet import DenseNet

    return DenseNet(
        growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2, num_classes=NC
    )


add("tv_densenet_eval", tv_densenet, img=32, mode="eval")
add(
    "tv_densenet_memeff_eval",
    lambda: __import__("torchvision").models.densenet.DenseNet(
        growth_rate=4,
        block_config=(2, 2),
        num_init_features=8,
        bn_size=2,
        num_classes=NC,
        memory_efficient=True,
    ),
    img=32,
    mode="eval",
)


def tv_squeezenet():
    return tvm.squeezenet1_1(weights=None, num_classes=NC)


add("tv_squeezenet1_1_train", tv_squeezenet, img=32, mode="train", note="dropout in classifier")


def tv_googlenet():
    return tvm.googlenet(weights=None, num_classes=NC, aux_logits=False, init_weights=False)


add("tv_googlenet_eval", tv_googlenet, img=32, mode="eval", tracker=False)


def tv_inception():
    return tvm.inception_v3(weights=None, num_classes=NC, aux_logits=False, init_weights=False)


def tv_vgg_nobn():
    from torchvision.models.vgg import VGG, make_layers

    feats = make_layers([8, "M", 16, "M", 16, 16, "M"], batch_norm=False)
    m = VGG(feats, num_classes=NC, dropout=0.5)
    m.avgpool = nn.AdaptiveAvgPool2d((2, 2))
    m.classifier = nn.Sequential(
        nn.Linear(16 * 4, 32), nn.ReLU(True), nn.Dropout(0.5), nn.Linear(32, NC)
    )
    return m


add("tv_vgg_nobn_train", tv_vgg_nobn, img=32, mode="train")


def tv_vgg_full_classifier():
    from torchvision.models.vgg import VGG, make_layers

    feats = make_layers([8, "M", 16, "M"], batch_norm=False)
    m = VGG(feats, num_classes=NC, dropout=0.5)  # AdaptiveAvgPool(7,7), Linear(16*49, 4096)
    m.classifier[0] = nn.Linear(16 * 49, 32)
    m.classifier[3] = nn.Linear(32, 32)
    m.classifier[6] = nn.Linear(32, NC)
    return m


add(
    "tv_vgg_adaptivepool_upsample_train",
    tv_vgg_full_classifier,
    img=16,
    mode="train",
    note="AdaptiveAvgPool2d(7,7) upsamples 4x4 -> 7x7",
)


def tv_alexnet():
    m = tvm.alexnet(weights=None, num_classes=NC)
    m.classifier = nn.Sequential(
        nn.Dropout(0.5), nn.Linear(256 * 36, 32), nn.ReLU(), nn.Linear(32, NC)
    )
    return m


add("tv_alexnet_train", tv_alexnet, img=64, mode="train", tracker=False)


def tv_resnet_gn():
    from torchvision.models.resnet import BasicBlock, ResNet

    m = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=NC, norm_layer=lambda c: nn.GroupNorm(2, c))
    return m


def tv_resnet_gn_small():
    from torchvision.models.resnet import Bottleneck, ResNet

    return ResNet(
        Bottleneck,
        [1, 1, 1, 1],
        num_classes=NC,
        norm_layer=lambda c: nn.GroupNorm(2, c),
        width_per_group=4,
        groups=2,
        zero_init_residual=False,
    )


add("tv_resnet_bottleneck_gn_groups_train", tv_resnet_gn_small, img=32, mode="train", tracker=False)
add(
    "tv_resnet18_eval",
    lambda: tvm.resnet18(weights=None, num_classes=NC),
    img=16,
    mode="eval",
    tracker=False,
)
add(
    "tv_resnet18_train_bn",
    lambda: tvm.resnet18(weights=None, num_classes=NC),
    img=16,
    mode="train",
    subbatch=False,
    tracker=False,
    note="expected refusal",
)


# torchvision.ops blocks
class OpsNet(nn.Module):
    def __init__(self, sd_mode="row", p=0.5):
        super().__init__()
        from torchvision.ops import MLP, Conv2dNormActivation, SqueezeExcitation, StochasticDepth

        self.c1 = Conv2dNormActivation(3, 8, 3, norm_layer=lambda c: nn.GroupNorm(2, c))
        self.c2 = Conv2dNormActivation(8, 8, 3, norm_layer=None)
        self.se = SqueezeExcitation(8, 4)
        self.sd = StochasticDepth(p, sd_mode)
        self.mlp = MLP(8, [16, NC], dropout=0.2)

    def forward(self, x):
        h = self.c1(x)
        h = h + self.sd(self.se(self.c2(h)))
        return self.mlp(h.mean((2, 3)))


add("tv_ops_blocks_sd_row_train", lambda: OpsNet("row"), mode="train")
add("tv_ops_blocks_sd_batch_train", lambda: OpsNet("batch"), mode="train")
add("tv_ops_blocks_eval", lambda: OpsNet("row"), mode="eval")


# ---------------- round 2: fixed builds ----------------
def gnk(num_channels=None, num_features=None, **kw):
    c = num_channels or num_features
    return nn.GroupNorm(2, c, **kw)


def convnext4(**kw):
    from timm.models.convnext import ConvNeXt

    base = dict(depths=(1, 1, 1, 1), dims=(8, 16, 16, 16), num_classes=NC, ls_init_value=0.1)
    base.update(kw)
    return lambda: ConvNeXt(**base)


add("timm_convnext", convnext4(), img=32, mode="train")
add("timm_convnext_convmlp", convnext4(conv_mlp=True), img=32, mode="train")
add("timm_convnext_headnorm_first", convnext4(head_norm_first=True), img=32, mode="train")
add("timm_convnext_droppath", convnext4(drop_path_rate=0.5), img=32, mode="train")
add("timm_convnext_v2_grn", convnext4(use_grn=True, ls_init_value=None), img=32, mode="train")
add("timm_convnext_headhidden", convnext4(head_hidden_size=12), img=32, mode="train")


def gmlp2():
    from timm.layers import GatedMlp
    from timm.models.mlp_mixer import MlpMixer, SpatialGatingBlock

    return MlpMixer(
        num_classes=NC,
        img_size=16,
        patch_size=4,
        num_blocks=2,
        embed_dim=32,
        mlp_ratio=2,
        block_layer=SpatialGatingBlock,
        mlp_layer=GatedMlp,
    )


add("timm_gmlp_spatial_gating", gmlp2, mode="train")


def metaformer(name, **kw):
    return lambda: (
        timm.create_model(
            name, pretrained=False, num_classes=NC, depths=(1, 1, 1, 1), dims=(8, 16, 16, 16), **kw
        )
        if False
        else timm.models.metaformer._create_metaformer(
            name,
            pretrained=False,
            num_classes=NC,
            depths=[1, 1, 1, 1],
            dims=[8, 16, 16, 16],
            **MF_KW[name],
            **kw,
        )
    )


MF_KW = {
    "poolformer_s12": dict(
        downsample_norm=None,
        mlp_act=nn.GELU,
        mlp_bias=True,
        norm_layers=timm.models.metaformer.GroupNorm1,
        layer_scale_init_values=1e-5,
        res_scale_init_values=None,
        use_mlp_head=False,
    ),
    "convformer_s18": dict(
        token_mixers=timm.models.metaformer.SepConv,
        norm_layers=timm.models.metaformer.LayerNorm2dNoBias,
    ),
    "caformer_s18": dict(
        token_mixers=[timm.models.metaformer.SepConv] * 2 + [timm.models.metaformer.Attention] * 2,
        norm_layers=[timm.models.metaformer.LayerNorm2dNoBias] * 2
        + [timm.models.metaformer.LayerNormNoBias] * 2,
    ),
}
add("timm_poolformer_s12_tiny", metaformer("poolformer_s12"), img=32, mode="train")
add("timm_convformer_tiny", metaformer("convformer_s18"), img=32, mode="train")
add("timm_caformer_tiny", metaformer("caformer_s18"), img=32, mode="train")


def effnet2(**kw):
    from timm.models.efficientnet import _gen_efficientnet

    return lambda: _gen_efficientnet(
        "efficientnet_b0", channel_multiplier=0.25, depth_multiplier=0.25, num_classes=NC, **kw
    )


add("timm_efficientnet_b0_eval", effnet2(), img=32, mode="eval")
add(
    "timm_efficientnet_b0_gnact_train",
    effnet2(
        norm_layer=functools.partial(timm.layers.GroupNormAct, num_groups=2), drop_path_rate=0.3
    ),
    img=32,
    mode="train",
)


def regnet2():
    return timm.create_model("regnety_002", pretrained=False, num_classes=NC)


add("timm_regnety_002_eval", regnet2, img=32, mode="eval", tracker=False)


def resnet_gn2(**kw):
    from timm.models.resnet import BasicBlock, ResNet

    return lambda: ResNet(
        BasicBlock,
        [1, 1, 1, 1],
        num_classes=NC,
        norm_layer=gnk,
        stem_width=8,
        channels=(8, 16, 16, 16),
        **kw,
    )


add("timm_resnet_gn_train", resnet_gn2(), img=32, mode="train")
add("timm_resnet_gn_droppath_train", resnet_gn2(drop_path_rate=0.5), img=32, mode="train")
add(
    "timm_resnet_gn_deep_stem_avgdown",
    resnet_gn2(stem_type="deep", avg_down=True),
    img=32,
    mode="train",
)


def vit_extra(**kw):
    return vit(**kw)


add("timm_vit_class_token_avg_pool", vit(global_pool="avg"), mode="train")
add("timm_vit_avgmax", vit(global_pool="avgmax", class_token=False), mode="train")
add(
    "timm_vit_token_pool_no_cls",
    vit(global_pool="token", reg_tokens=1, class_token=True, no_embed_class=True),
    mode="train",
)
add("timm_vit_pos_embed_none", vit(pos_embed="none"), mode="train")
add("timm_vit_final_norm_false", vit(final_norm=False), mode="train")
add("tv_swin_v2_double", lambda: tv_swin(v2=True)().double(), img=32, mode="train")
add("tv_maxvit_train_nosd", tv_maxvit, img=32, mode="train", note="BN train -> refusal expected")


# ---------------- round 3 ----------------
from timm.models import (
    convit,
    crossvit,
    edgenext,
    levit,
    pit,
    pvt_v2,
    sequencer,
    tiny_vit,
    twins,
    vision_transformer_relpos,
)

add(
    "timm_edgenext_posemb",
    lambda: edgenext.EdgeNeXt(
        num_classes=NC,
        dims=(8, 16, 16, 16),
        depths=(1, 1, 1, 1),
        global_block_counts=(0, 1, 1, 1),
        heads=(2, 2, 2, 2),
        use_pos_emb=(False, True, False, False),
        d2_scales=(2, 2, 2, 2),
    ),
    img=32,
    mode="train",
)
add(
    "timm_edgenext_noposemb",
    lambda: edgenext.EdgeNeXt(
        num_classes=NC,
        dims=(8, 16, 16, 16),
        depths=(1, 1, 1, 1),
        global_block_counts=(0, 1, 1, 1),
        heads=(2, 2, 2, 2),
        use_pos_emb=(False, False, False, False),
        d2_scales=(2, 2, 2, 2),
    ),
    img=32,
    mode="train",
)
add(
    "timm_levit_eval",
    lambda: levit.Levit(
        img_size=32,
        num_classes=NC,
        embed_dim=(16, 32),
        key_dim=8,
        depth=(1, 1),
        num_heads=(2, 2),
        stem_type="s16" if False else "s8",
    ),
    img=32,
    mode="eval",
)
add(
    "timm_levit_conv_eval",
    lambda: levit.Levit(
        img_size=32,
        num_classes=NC,
        embed_dim=(16, 32),
        key_dim=8,
        depth=(1, 1),
        num_heads=(2, 2),
        use_conv=True,
        stem_type="s8",
    ),
    img=32,
    mode="eval",
)
add(
    "timm_tinyvit_eval",
    lambda: tiny_vit.TinyVit(
        num_classes=NC,
        embed_dims=(8, 16, 16, 16),
        depths=(1, 1, 1, 1),
        num_heads=(1, 2, 2, 2),
        window_sizes=(2, 2, 2, 2),
    ),
    img=32,
    mode="eval",
)
add(
    "timm_convit",
    lambda: convit.ConVit(
        img_size=16,
        patch_size=4,
        num_classes=NC,
        embed_dim=32,
        depth=2,
        num_heads=2,
        local_up_to_layer=1,
    ),
    mode="train",
)
add(
    "timm_sequencer2d",
    lambda: sequencer.Sequencer2d(
        num_classes=NC,
        img_size=32,
        layers=(1, 1),
        patch_sizes=(4, 2),
        embed_dims=(16, 16),
        hidden_sizes=(8, 8),
        mlp_ratios=(2.0, 2.0),
    ),
    img=32,
    mode="train",
)
add(
    "timm_pvt_v2",
    lambda: pvt_v2.PyramidVisionTransformerV2(
        num_classes=NC,
        depths=(1, 1),
        embed_dims=(16, 32),
        num_heads=(1, 2),
        sr_ratios=(2, 1),
        mlp_ratios=(2, 2),
    ),
    img=32,
    mode="train",
)
add(
    "timm_pvt_v2_linear",
    lambda: pvt_v2.PyramidVisionTransformerV2(
        num_classes=NC,
        depths=(1, 1),
        embed_dims=(16, 32),
        num_heads=(1, 2),
        sr_ratios=(2, 1),
        mlp_ratios=(2, 2),
        linear=True,
    ),
    img=32,
    mode="train",
)
add(
    "timm_twins_svt",
    lambda: twins.Twins(
        img_size=32,
        patch_size=4,
        num_classes=NC,
        embed_dims=(16, 32),
        num_heads=(1, 2),
        mlp_ratios=(2, 2),
        depths=(2, 2),
        sr_ratios=(2, 1),
        wss=(4, 4),
        block_cls=twins.Block,
    ),
    img=32,
    mode="train",
)
add(
    "timm_pit_distilled",
    lambda: pit.PoolingVisionTransformer(
        img_size=32,
        patch_size=8,
        stride=4,
        base_dims=(16, 16),
        depth=(1, 1),
        heads=(1, 2),
        num_classes=NC,
        distilled=True,
    ),
    img=32,
    mode="train",
)
add(
    "timm_vit_relpos_mlp",
    lambda: vision_transformer_relpos.VisionTransformerRelPos(
        img_size=16,
        patch_size=4,
        num_classes=NC,
        embed_dim=32,
        depth=2,
        num_heads=2,
        rel_pos_type="mlp",
    ),
    mode="train",
)
add(
    "timm_vit_relpos_bias",
    lambda: vision_transformer_relpos.VisionTransformerRelPos(
        img_size=16,
        patch_size=4,
        num_classes=NC,
        embed_dim=32,
        depth=2,
        num_heads=2,
        rel_pos_type="bias",
    ),
    mode="train",
)
add(
    "timm_vit_srelpos_shared",
    lambda: vision_transformer_relpos.VisionTransformerRelPos(
        img_size=16,
        patch_size=4,
        num_classes=NC,
        embed_dim=32,
        depth=2,
        num_heads=2,
        rel_pos_type="mlp",
        shared_rel_pos=True,
    ),
    mode="train",
)
add(
    "timm_crossvit",
    lambda: crossvit.CrossVit(
        img_size=16,
        img_scale=(1.0, 1.0),
        patch_size=(4, 8),
        num_classes=NC,
        embed_dim=(16, 32),
        depth=((1, 1, 0),),
        num_heads=(2, 2),
        mlp_ratio=(2.0, 2.0, 2.0),
    ),
    mode="train",
)
add(
    "timm_caformer_tiny2",
    lambda: timm.models.metaformer._create_metaformer(
        "caformer_s18",
        pretrained=False,
        num_classes=NC,
        depths=[1, 1, 1, 1],
        dims=[32, 32, 32, 32],
        token_mixers=[timm.models.metaformer.SepConv] * 2 + [timm.models.metaformer.Attention] * 2,
        norm_layers=[timm.models.metaformer.LayerNorm2dNoBias] * 2
        + [timm.models.metaformer.LayerNormNoBias] * 2,
    ),
    img=32,
    mode="train",
)
for _n in ["timm_levit", "timm_levit_conv", "timm_tinyvit"]:
    MODELS[_n + "_train_bneval"] = dict(MODELS[_n + "_eval"], mode="train_bneval")
MODELS["tv_maxvit_train_bneval"] = dict(MODELS["tv_maxvit_eval"], mode="train_bneval")
add("timm_coatnet_train_bneval", coatnet, img=32, mode="train_bneval")
add("timm_mobilenetv3_train_bneval", mnv3, img=32, mode="train_bneval")
add(
    "timm_efficientnet_b0_train_bneval_dp",
    effnet2(drop_path_rate=0.3, drop_rate=0.2),
    img=32,
    mode="train_bneval",
)
add("tv_efficientnet_train_bneval_sd", tv_effnet, img=32, mode="train_bneval")
add("tv_googlenet_train_bneval", tv_googlenet, img=32, mode="train_bneval", tracker=False)
add("tv_inception_v3_eval", tv_inception, img=75, mode="eval", tracker=False, subbatch=False)
