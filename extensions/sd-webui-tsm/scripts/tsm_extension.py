"""sd-webui-tsm: registers the ``<tsm:name:weight>`` extra network, its card page and callbacks.

All logic is in ``tsm_a1111`` (testable without A1111); the weights are hosted by the built-in Lora
extension (``tsm_a1111/lora_network.py``).
"""

import os
import sys

_EXT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _EXT_ROOT not in sys.path:
    sys.path.insert(0, _EXT_ROOT)

from modules import extra_networks, paths, script_callbacks, shared, ui_extra_networks  # noqa: E402

import tsm_a1111  # noqa: E402
from tsm_trainer.core.file_format import TSMFileError, read_metadata  # noqa: E402


def _models_dir():
    return getattr(shared.cmd_opts, "tsm_dir", None) or os.path.join(paths.models_path, "TSM")


def _lora():
    """The built-in Lora extension's ``network`` and ``networks`` modules (extensions-builtin/Lora),
    which host TSM's weights (see tsm_a1111/lora_network.py)."""
    network, networks = sys.modules.get("network"), sys.modules.get("networks")
    if not (
        hasattr(network, "NetworkModule")
        and hasattr(networks, "network_apply_weights")
        and hasattr(networks, "loaded_networks")
    ):
        raise RuntimeError(
            "sd-webui-tsm applies TSM files through the built-in Lora extension "
            "(extensions-builtin/Lora), which is not loaded: enable it in Extensions > Installed"
        )
    return tsm_a1111.LoraHost(network, networks)


class ExtraNetworkTSM(extra_networks.ExtraNetwork, tsm_a1111.TSMExtraNetworkCore):
    def __init__(self):
        extra_networks.ExtraNetwork.__init__(self, "tsm")
        tsm_a1111.TSMExtraNetworkCore.__init__(
            self,
            _models_dir,
            lambda: shared.sd_model,
            _lora,
            default_multiplier=lambda: float(getattr(shared.opts, "extra_networks_default_multiplier", 1.0)),
        )

    def activate(self, p, params_list):
        tsm_a1111.TSMExtraNetworkCore.activate(self, p, params_list)

    def deactivate(self, p=None):
        tsm_a1111.TSMExtraNetworkCore.deactivate(self, p)


class ExtraNetworksPageTSM(ui_extra_networks.ExtraNetworksPage):
    def __init__(self, network):
        super().__init__("TSM")
        self.network = network

    def refresh(self):
        self.network.refresh()

    def create_item(self, name, index=None, enable_filter=True):
        path = self.network.available.get(name)
        if path is None:
            return None
        try:
            metadata = read_metadata(path)
        except TSMFileError:
            return None
        base = os.path.splitext(path)[0]
        item = tsm_a1111.card_item_fields(name, metadata, path, "opts.extra_networks_default_multiplier")
        item.update(
            {
                "preview": self.find_preview(base),
                "search_term": self.search_terms_from_path(path),  # <= 1.7
                "search_terms": [self.search_terms_from_path(path)],  # 1.8+
                "local_preview": f"{base}.{shared.opts.samples_format}",
                "sort_keys": {"default": index, **self.get_sort_keys(path)},
            }
        )
        user_description = self.find_description(base)
        if user_description:
            item["description"] = user_description + "<br>" + item["description"]
        return item

    def list_items(self):
        if not self.network.available:
            self.network.refresh()
        names = sorted({os.path.splitext(os.path.basename(p))[0]: None for p in self.network.available.values()})
        for index, name in enumerate(names):
            item = self.create_item(name, index)
            if item is not None:
                yield item

    def allowed_directories_for_previews(self):
        return [_models_dir()]


network = ExtraNetworkTSM()


def before_ui():
    os.makedirs(_models_dir(), exist_ok=True)
    extra_networks.register_extra_network(network)
    ui_extra_networks.register_page(ExtraNetworksPageTSM(network))


def unload():
    network.deactivate(None)


script_callbacks.on_before_ui(before_ui)
script_callbacks.on_cfg_denoiser(network.on_cfg_denoiser)
script_callbacks.on_model_loaded(network.forget)
script_callbacks.on_script_unloaded(unload)
