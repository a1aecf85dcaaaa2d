from twisted.application.service import ServiceMaker

ppforwarder = ServiceMaker(
    "ppbridge forwarder", "ppbridge.forwarder_tap", "Public HTTP side of ppbridge.", "ppforwarder"
)
ppproxy = ServiceMaker(
    "ppbridge proxy", "ppbridge.proxy_tap", "Private-network side of ppbridge.", "ppproxy"
)
